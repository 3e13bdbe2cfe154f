"""Observability: metrics.jsonl (always), wandb (optional, never fatal), the start summary, sample files.

metrics.jsonl has one JSON object per line with a `type`:
  train  step, tokens, time (seconds since the start, summed over resumes), loss (mean over the steps since the
         previous line), lr, grad_norm, tok_per_s, mfu; MoE only: aux_loss, z_loss (balancing terms with their
         coefficients) and expert_load (per MoE layer, fraction of routed slots per expert since the previous line);
         skipped (steps skipped for a non-finite loss, when any)
  eval   step, tokens, time, val_loss, val_ppl, val_bpb, val_tokens
  final  the final metrics returned by `train()`
`step` counts optimizer steps completed. mfu = FLOPs/token (model.flops_per_token) x tok_per_s / peak, the peak being
train.peak_flops or, when null, this machine's best-of-k square-matmul peak in the training precision, cached per
CPU/GPU, dtype and thread count (train/hardware.py):
a fraction of what this machine's matmul kernel reaches, not of a datasheet number. On resume every line after the checkpoint's step is dropped so that the file
reads as if the run had never stopped.

wandb is imported lazily (it takes seconds) and every call is guarded: if it cannot start the run falls back to
offline, then to none, with one warning; if it raises mid-run it is switched off with one warning.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import string
import struct
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from train import fsutil
from train.errors import CheckpointError


def write_atomic(path: Path, data: str) -> None:
    """A run file (metrics.jsonl rewrite, samples): `train.fsutil.write_atomic`, a failure as a CheckpointError
    naming the file like every other write into the run directory."""
    fsutil.write_atomic(path, data, error=fsutil.write_error(CheckpointError))


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf become None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Keep the lines of steps <= `step` (and no `final` line): the file an uninterrupted run had at that step."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(rec, dict) and rec.get("type") != "final" and rec.get("step", math.inf) <= step:
                kept.append(line)
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def reset(self) -> None:
        write_atomic(self.path, "")

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(_clean(record)) + "\n")
        except OSError as e:
            raise CheckpointError(f"cannot write {self.path}: {e.strerror or e}") from None


def routing_metrics(model, rt) -> dict:
    """The train record's routing fields since the last train line, averaged over ranks (a collective when the
    model counts expert load): `expert_load` (per layer, per router output) and each layer's health() (MoE:
    moe_max_vio, moe_router_entropy, ...) as name -> per layer; the windows start again. {} for models without
    counting layers. `rt` is the run's train.runtime.Runtime."""
    per_layer = model.expert_load()  # [] without layers that count their expert load
    if not per_layer:
        return {}
    flat = rt.all_reduce_sum([v for layer in per_layer for v in layer])
    it = iter(v / rt.world_size for v in flat)
    record = {"expert_load": [[next(it) for _ in layer] for layer in per_layer]}
    layers = [ffn.health() for ffn in model.moe_layers() if hasattr(ffn, "health")]
    names = list(layers[0]) if layers else []
    it = iter(v / rt.world_size for v in rt.all_reduce_sum([h[n] for h in layers for n in names]))
    rows = [[next(it) for _ in names] for _ in layers]
    record.update({n: [row[i] for row in rows] for i, n in enumerate(names)})
    model.reset_expert_load()
    return record


def write_samples(run_dir: Path, samples: list[dict], step: int) -> None:
    write_atomic(Path(run_dir) / "samples.json", json.dumps({"step": step, "samples": samples}, indent=1))
    md = [f"# Samples at step {step}", ""]
    for s in samples:
        md += [f"**{s['prompt']}**", "", "```", s["prompt"] + s["completion"], "```", ""]
    write_atomic(Path(run_dir) / "samples.md", "\n".join(md))


# ----------------------------------------------------------------------------------------------------------------
# wandb

class WandbTracker:
    """A wandb run that can never stop training. `run` is None when wandb is off (disabled, or it failed)."""

    def __init__(self, cfg, run_dir: Path, run_id: Optional[str], config: dict, summary: dict):
        self.run = None
        self.id: Optional[str] = run_id
        self.dir: Optional[str] = None
        self._warned = False
        if cfg.wandb.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")  # keep the console for the progress bar
        wandb_dir = os.environ.get("WANDB_DIR") or str(run_dir)
        modes = [cfg.wandb.mode] + (["offline"] if cfg.wandb.mode == "online" else [])
        problems = []
        try:
            import wandb
            self.id = run_id or _new_run_id()
        except Exception as e:  # a broken install must not stop training either
            self._warn(f"wandb is unavailable ({_short(e)}); metrics are in metrics.jsonl only")
            return

        def start(mode: str, run_id_try: str) -> bool:
            try:
                self.run = wandb.init(
                    project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.wandb.group,
                    tags=list(cfg.wandb.tags), notes=cfg.wandb.notes, name=cfg.wandb.name or cfg.run_name,
                    id=run_id_try, resume="allow", dir=wandb_dir, mode=mode, config=config,
                    settings=wandb.Settings(init_timeout=cfg.wandb.init_timeout, console="off"))
                self.id = run_id_try
                return True
            except Exception as e:
                problems.append(f"{mode}: {_short(e)}")
                try:  # a failed init can keep the run id registered ("run ID ... is in use") and block the fallback
                    wandb.teardown()
                except Exception:
                    pass
                return False

        if not any(start(mode, self.id) for mode in modes) and len(modes) > 1 and "in use" in problems[-1]:
            # A timed-out online init can keep its run id registered in wandb's service even after teardown, which
            # blocks the offline fallback under the same id: one more try under a fresh id (the run's own history
            # stays whole; only `wandb sync` sees two ids).
            start("offline", _new_run_id())
        if self.run is None:
            self._warn(f"wandb could not start ({'; '.join(problems)}); metrics are in metrics.jsonl only")
            return
        if problems:
            self._warn(f"wandb could not start online ({problems[0]}); logging offline instead "
                       f"(upload later with `wandb sync {self.run.dir.rsplit('/files', 1)[0]}`)")
        self.dir = str(Path(self.run.dir).parent)
        self._guard(lambda: self.run.summary.update(summary))

    def _warn(self, msg: str) -> None:
        if not self._warned:
            warn(msg)
            self._warned = True

    def _guard(self, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:
            self._warn(f"wandb failed mid-run ({_short(e)}); it is switched off, metrics.jsonl stays complete")
            self.run = None

    def log(self, record: dict, step: int) -> None:
        self._guard(lambda: self.run.log(_wandb_record(record), step=step))

    def summary(self, values: dict) -> None:
        self._guard(lambda: self.run.summary.update(_clean(values)))

    def samples_table(self, samples: list[dict], step: int) -> None:
        def log_table():
            import wandb
            table = wandb.Table(columns=["prompt", "completion"], data=[[s["prompt"], s["completion"]] for s in samples])
            self.run.log({"samples": table}, step=step)
        self._guard(log_table)

    def finish(self, exit_code: int = 0) -> None:
        self._guard(lambda: self.run.finish(exit_code=exit_code))
        self.run = None


def _new_run_id() -> str:
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or e.__class__.__name__
    return text[:200]


def _wandb_record(record: dict) -> dict:
    """Flat wandb keys: train/*, val/*, aux/*, moe/load_l{layer}_e{expert} for the expert load, and moe/{name}_l{layer}
    plus the layer mean moe/{name} for each routing-health list (moe_max_vio, ...)."""
    out = {}
    for key, value in record.items():
        if key in ("type", "step"):
            continue
        if key == "expert_load":
            for li, layer in enumerate(value or []):
                for ei, frac in enumerate(layer):
                    out[f"moe/load_l{li}_e{ei}"] = frac
                if layer:
                    out[f"moe/max_load_l{li}"] = max(layer) * len(layer)  # 1.0 = perfectly balanced
        elif key.startswith("moe_") and isinstance(value, list):  # routing health, one value per MoE layer
            for li, v in enumerate(value):
                out[f"moe/{key[4:]}_l{li}"] = v
            if value:
                out[f"moe/{key[4:]}"] = sum(value) / len(value)
        elif key.startswith("val_"):
            out[f"val/{key[4:]}"] = value
        elif key.endswith("_loss") and key != "loss":  # MoE balancing terms
            out[f"aux/{key}"] = value
        else:
            out[f"train/{key}"] = value
    return _clean(out)


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a `.wandb` run file (a LevelDB-style log: 7-byte file header, 32 KiB blocks, records
    with a 7-byte header crc32/length/type, split FIRST/MIDDLE/LAST across blocks). For tests and debugging."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    pos, block, chunk, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if pos + length > len(data):  # a record still being written (the wandb service flushes on its own)
            break
        chunk += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(chunk)
            records.append(rec)
            chunk = b""
    return records


def read_wandb_history(path: Path) -> list[dict]:
    """The logged rows (`run.log`) of a `.wandb` run file, as dicts."""
    rows = []
    for rec in read_wandb_records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Start summary

def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def start_summary(cfg, counts: dict, flops_per_token: int, d_ff: int, max_steps: int, tokens_per_step: int,
                  data_meta: dict, vocab_size: int, rt, dtype: str, peak_flops: float, run_dir: Path,
                  resumed_from: Optional[int], compile_mode: str = "off") -> str:
    m, t = cfg.model, cfg.train
    from train.config import ffn_label
    ffn = ffn_label(m.ffn) + (f" d_ff={d_ff}" if d_ff else "")  # d_ff 0: no FFN sub-layer
    rows = [
        ("run", f"{cfg.run_name} -> {run_dir}" + (f" (resuming from step {resumed_from})" if resumed_from else "")),
        ("model", f"d={m.hidden_size} L={m.num_hidden_layers} heads={m.num_attention_heads}/{m.num_key_value_heads}kv"
                  f" seq={m.max_seq_len} vocab={vocab_size} ffn={ffn}"),
        ("params", f"total {_fmt(counts['total'])}, active {_fmt(counts['active'])}, "
                   f"embedding {_fmt(counts['embedding'])}, attention {_fmt(counts['attention'])}, "
                   f"ffn {_fmt(counts['ffn'])} (active {_fmt(counts['ffn_active'])})"),
        # same definition as model.ffn_share(): FFN params / total, 6·active FFN params / training FLOPs per token
        ("ffn share", f"{counts['ffn'] / counts['total']:.1%} of params, "
                      f"{6 * counts['ffn_active'] / flops_per_token:.1%} of training FLOPs/token"),
        ("compute", f"{_fmt(flops_per_token)} FLOPs/token (train), peak {_fmt(peak_flops)}FLOP/s for MFU"),
        ("budget", f"{max_steps} steps x {_fmt(tokens_per_step)} tokens = {_fmt(max_steps * tokens_per_step)} tokens "
                   f"(batch {t.micro_batch_size}x{t.grad_accum} accum, lr {t.lr:g}->{t.min_lr:g}, "
                   f"warmup {t.warmup_steps})"),
        ("data", f"{cfg.data.corpus}: {_fmt(data_meta.get('train_tokens', 0))} train / "
                 f"{_fmt(data_meta.get('val_tokens', 0))} val tokens "
                 f"({_fmt(max_steps * tokens_per_step / max(data_meta.get('train_tokens', 1), 1))} epochs)"),
        ("device", f"{rt.device} x{rt.world_size}, "
                   + (f"{dtype} autocast, fp32 weights" if dtype != "fp32" else "fp32 (no autocast)")
                   + (f", {os.cpu_count()} cpus / {torch.get_num_threads()} threads"
                      if rt.device.type == "cpu" else "")
                   + (", eager" if compile_mode == "off" else f", compiled: {compile_mode}")
                   + (" (train.compile=auto)" if t.compile == "auto" else "")),
        ("wandb", f"{cfg.wandb.mode} project={cfg.wandb.project}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:>{width}} | {v}" for k, v in rows)
