"""The training loop: `train(cfg) -> dict`.

One optimizer step = `grad_accum` micro-batches of `micro_batch_size` sequences of `model.max_seq_len` tokens; under
torchrun each of the W ranks runs grad_accum / W of them on its own part of the batch, so the global batch never
depends on the number of processes. Training minimises loss + aux_loss (MoE balancing terms, coefficients already
applied) under autocast with fp32 master weights (see train/optim.py for AdamW groups and the schedule).

Exact resume: the batch of step s is a pure function of (seed, s), the learning rate a function of s, and a checkpoint
holds weights, optimizer state, RNG states and the open logging window, so stopping after step N and resuming
reproduces the uninterrupted run bit for bit on CPU (same machine and thread count).

Shapes: x_BT / y_BT are (batch, time) token ids.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from train import checkpoint as ck
from train.config import RunConfig
from train.errors import CheckpointError, ConfigError, DataError, UserError
from train.optim import build_optimizer, lr_at, plan_budget, set_lr
from train.rundir import check_same_model, final_record, open_run_dir, resolve_vocab, write_run_files
from train.runtime import (Runtime, StopRequest, clip_grad_norm, grad_sync, measure_peak_flops, seed_everything,
                           settle_auto_dtype, setup_runtime, shard_model, wrap_model)
from train.compiler import compile_for_training, eager, resolve_compile
from train.train_state import (capture_rng, load_optimizer_state, load_weights, model_state, optimizer_state,
                               restore_moe_windows, restore_rng, unsharded_copy)
from train.tracking import WandbTracker, routing_metrics, start_summary, write_samples


class TrainingDiverged(UserError):
    """Non-finite loss or gradient norm with train.nan_policy=stop."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM: a checkpoint was written at the step boundary; `str(e)` says where."""


def train(cfg: RunConfig) -> dict:
    """Train (or resume) the run described by `cfg`; returns the final metrics (val_loss, val_bpb, tokens, ...)."""
    rt = setup_runtime(cfg.train.device, cfg.train.dtype, cfg.train.num_threads, cfg.train.parallel)
    trainer, failed = None, True
    try:
        trainer = Trainer(cfg, rt)
        result = trainer.run()
        failed = False
        return result
    except TrainingInterrupted:
        failed = False  # stopped cleanly with a checkpoint
        raise
    finally:
        if trainer is not None:
            trainer.close(failed=failed)
        rt.close()


# ----------------------------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: RunConfig, rt: Runtime):
        self.rt, self.run_dir = rt, cfg.out_dir
        self.say = print if rt.is_main else (lambda *a, **k: None)
        self.lock = self.tracker = self.metrics = None
        try:
            self._setup(cfg)
        except BaseException:
            self.close(failed=True)  # e.g. release the run-directory lock
            raise

    def _setup(self, cfg: RunConfig) -> None:
        from model.model_minimind import MiniMindForCausalLM
        from train.data import TrainBatches, prepare_data, val_batches

        t, rt = cfg.train, self.rt
        if t.grad_accum % rt.world_size:
            raise ConfigError(f"train.grad_accum={t.grad_accum} must be divisible by the number of processes "
                              f"({rt.world_size}) so that the global batch stays the same")
        found = rt.on_main(lambda: self._open(cfg))
        ckpt = Path(found) if found else None
        # progress bars on a terminal only (like the training bar): in logs they bury an error's one line
        self.prepared = rt.main_first(lambda: prepare_data(cfg.data, progress=rt.is_main and sys.stderr.isatty()))
        self.cfg = cfg = resolve_vocab(cfg, self.prepared.vocab_size)
        self.config_dict = cfg.to_dict()
        if ckpt is not None:
            check_same_model(ckpt, cfg)
        # train.dtype=auto: now that the vocab is known, a CPU with native bf16 measures which dtype is faster
        dtype_line = settle_auto_dtype(rt, cfg.model, t.micro_batch_size)
        if dtype_line:
            self.say(dtype_line, flush=True)
        self.seq_len = cfg.model.max_seq_len
        self.max_steps, self.tokens_per_step = plan_budget(t, self.seq_len)
        self.local_accum = t.grad_accum // rt.world_size

        seed_everything(t.seed)
        self.model = MiniMindForCausalLM(cfg.model).to(rt.device)
        if ckpt is None and getattr(cfg.model.ffn, "upcycle_from", None):  # a fresh MoE from a finished dense run
            from train.upcycle import upcycle
            upcycle(self.model, cfg.model, self.prepared.tokenizer_path, say=self.say)
        elif ckpt is None and t.init_from:  # a fresh run from a finished run of the same model (fresh optimizer)
            from train.upcycle import init_from
            init_from(self.model, cfg, self.prepared.tokenizer_path, say=self.say)
        if rt.fsdp and t.optimizer == "muon" and any(p.ndim == 3 for p in self.model.parameters()):
            raise ConfigError("train.optimizer=muon with train.parallel=fsdp does not take MoE expert stacks yet "
                              "(Muon orthogonalises each expert's matrix; FSDP shards the stack across experts): "
                              "use train.parallel=ddp or train.optimizer=adamw")
        # fsdp: shard in place (parameters become DTensor shards) before the optimizer takes the parameters
        shard_model(self.model, self.model.model.layers, rt)
        self.optimizer = build_optimizer(self.model, t)
        self.scaler = torch.amp.GradScaler("cuda") if rt.dtype == "fp16" else None
        self.ddp_model = wrap_model(self.model, rt)  # ddp: the DDP wrapper; fsdp / one process: the model itself
        # (with fsdp, torch.compile breaks the graph at FSDP2's hooks, which stay eager)
        self.compile_mode = resolve_compile(t.compile, self.max_steps)
        self.step_model = compile_for_training(self.model, self.ddp_model, self.compile_mode)
        self.batches = TrainBatches(self.prepared.train_path, self.prepared.dtype, self.seq_len, t.micro_batch_size,
                                    self.local_accum, t.seed, rt.rank, rt.world_size)
        self.val = val_batches(self.prepared, self.seq_len, t.micro_batch_size, t.eval_tokens)  # reporting blocks
        try:  # selection (a sweep's tuning grid) reads these, at the end of the run only
            self.val_tune = val_batches(self.prepared, self.seq_len, t.micro_batch_size, t.eval_tokens, part="tune")
        except DataError:
            self.val_tune = None

        self.step, self.elapsed, self.wandb_id = 0, 0.0, None
        self.meter = self._new_meter()
        self.saved_step, self.saved_path = -1, None
        self.eval_step, self.last_val, self.last_loss = -1, {}, None
        if ckpt is not None:
            self._restore(ckpt)
        rt.on_main(self._write_run_files)

    def _open(self, cfg: RunConfig) -> Optional[str]:
        self.lock, found = open_run_dir(cfg)
        return str(found) if found else None

    def _restore(self, ckpt: Path) -> None:
        load_weights(self.model, ckpt / ck.WEIGHTS)  # fsdp: every rank reads the full file and keeps its shard
        state = ck.load_state(ckpt)
        try:
            load_optimizer_state(self.optimizer, state["optimizer"], self.model)
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"optimizer state in {ckpt} does not fit this model: {e}") from None
        rngs = state["rng"]
        restore_rng(rngs[self.rt.rank] if self.rt.rank < len(rngs) else rngs[0])
        self.step, self.elapsed = int(state["step"]), float(state.get("elapsed", 0.0))
        self.wandb_id = state.get("wandb_id")
        self.meter = {**self._new_meter(), **(state.get("meter") or {})}
        self.saved_step, self.saved_path = self.step, str(ckpt)
        # the open logging window (load counts, routing-health counters), so the next train line matches
        restore_moe_windows(self.model, state, self.rt.rank)
        if state.get("world_size", 1) != self.rt.world_size:
            self.say(f"note: the checkpoint was written by {state.get('world_size')} process(es), this run has "
                     f"{self.rt.world_size}: same global batch, but not bitwise identical to an uninterrupted run")
        self.say(f"resuming from step {self.step} ({ckpt})")

    def _write_run_files(self) -> None:
        self.metrics = write_run_files(self.run_dir, self.cfg, self.prepared.tokenizer_path, self.step, self.max_steps)

    def _new_meter(self) -> dict:
        """Sums over the steps since the last train line (saved in checkpoints so resumed lines match)."""
        return {"loss": 0.0, "grad_norm": 0.0, "steps": 0, "skipped": 0, "aux": {}}

    # -- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        if self.step >= self.max_steps:
            done = self.rt.on_main(lambda: final_record(self.metrics.path, self.step))
            if done:
                self.say(f"run already complete at step {self.step} ({self.run_dir}); nothing to do")
                return done
        self._start_tracking()
        stop = StopRequest().install()
        try:
            self._loop(stop)
        finally:
            stop.restore()
        return self._finish()

    def _start_tracking(self) -> None:
        from model.config import resolve_d_ff

        t, rt = self.cfg.train, self.rt
        self.counts = self.model.param_counts()
        self.flops_per_token = self.model.flops_per_token(self.seq_len)
        self.peak_flops = (t.peak_flops or measure_peak_flops(rt)) * rt.world_size
        if not rt.is_main:
            return
        print(start_summary(self.cfg, self.counts, self.flops_per_token, resolve_d_ff(self.cfg.model.ffn,
              self.cfg.model.hidden_size), self.max_steps, self.tokens_per_step, self.prepared.meta,
              self.cfg.model.vocab_size, rt, rt.dtype, self.peak_flops, self.run_dir,
              self.step or None, self.compile_mode), flush=True)
        run_info = {"params": self.counts, "flops_per_token": self.flops_per_token, "max_steps": self.max_steps,
                    "tokens_per_step": self.tokens_per_step, "world_size": rt.world_size, "dtype_resolved": rt.dtype,
                    "device": str(rt.device), "peak_flops": self.peak_flops, "compile": self.compile_mode}
        self.tracker = WandbTracker(self.cfg, self.run_dir, self.wandb_id, {**self.config_dict, "run": run_info},
                                    {"params_total": self.counts["total"], "params_active": self.counts["active"],
                                     "flops_per_token": self.flops_per_token})
        self.wandb_id = self.tracker.id

    def _loop(self, stop: StopRequest) -> None:
        from tqdm import tqdm

        t = self.cfg.train
        interactive = self.rt.is_main and sys.stderr.isatty()
        self.bar = tqdm(total=self.max_steps, initial=self.step, disable=not interactive, dynamic_ncols=True,
                        desc=self.cfg.run_name, unit="step", file=sys.stderr)
        t0, elapsed0 = time.perf_counter(), self.elapsed
        self.window_time, self.window_steps, self.session_time, self.session_tokens = 0.0, 0, 0.0, 0
        try:
            while self.step < self.max_steps:
                step_t0 = time.perf_counter()
                stop_now = self._train_step(stop) or self.step + 1 == t.stop_at_step
                dt = time.perf_counter() - step_t0
                self.window_time += dt
                self.window_steps += 1
                self.session_time += dt
                self.session_tokens += self.tokens_per_step
                self.step += 1
                self.elapsed = elapsed0 + time.perf_counter() - t0
                self.bar.update(1)
                last = self.step == self.max_steps
                if self.step % t.log_interval == 0 or last:
                    self._log_train()
                if self.step % t.eval_interval == 0 or last:
                    self._evaluate()
                if stop_now or self.step % t.ckpt_interval == 0 or last:
                    self._save()
                if stop_now and not last:
                    why = "interrupted" if stop.signum is not None else "stopped (train.stop_at_step)"
                    raise TrainingInterrupted(f"{why} at step {self.step}: checkpoint saved to "
                                              f"{self.saved_path}; run the same command again to resume")
        finally:
            self.bar.close()

    def _train_step(self, stop: StopRequest) -> bool:
        """One optimizer step; returns whether a stop (Ctrl-C / SIGTERM on any rank) was requested."""
        t, rt = self.cfg.train, self.rt
        set_lr(self.optimizer, lr_at(self.step, t, self.max_steps))  # Muon groups: x their lr_scale
        loss_sum, aux_sums = torch.zeros((), device=rt.device), {}
        for micro in range(self.local_accum):
            x_BT, y_BT = self.batches.get(self.step, micro)
            x_BT, y_BT = x_BT.to(rt.device, non_blocking=True), y_BT.to(rt.device, non_blocking=True)
            # gradients are reduced across ranks after the last micro-step only (ddp: no_sync; fsdp: no reduce-scatter)
            with grad_sync(self.ddp_model, rt, sync=micro == self.local_accum - 1):
                with rt.autocast():
                    out = self.step_model(x_BT, y_BT)
                    objective = (out.loss + out.aux_loss) / self.local_accum
                (self.scaler.scale(objective) if self.scaler else objective).backward()
            loss_sum += out.loss.detach().float()  # summed on the device: one sync per step, not per micro-step
            for key, value in (out.aux_losses or {}).items():
                aux_sums[key] = aux_sums.get(key, 0.0) + float(value)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # the whole model's norm on every rank (fsdp: reduced over the shards)
        grad_norm = clip_grad_norm(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        aux_keys = sorted(aux_sums)
        reduced = rt.all_reduce_sum([float(loss_sum) / self.local_accum, float(stop.signum is not None)]
                                    + [aux_sums[k] / self.local_accum for k in aux_keys])
        loss = reduced[0] / rt.world_size
        finite = math.isfinite(loss) and (self.scaler is not None or math.isfinite(grad_norm))
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.model.after_optimizer_step(skipped=False)
            m = self.meter
            m["loss"] += loss
            m["grad_norm"] += grad_norm if math.isfinite(grad_norm) else 0.0
            m["steps"] += 1
            for key, value in zip(aux_keys, reduced[2:]):
                m["aux"][key] = m["aux"].get(key, 0.0) + value / rt.world_size
        elif t.nan_policy == "skip":
            self.meter["skipped"] += 1
            self.model.after_optimizer_step(skipped=True)  # e.g. the MoE drops the skipped step's routing counts
            self.say(f"warning: non-finite loss/grad norm at step {self.step + 1} "
                     f"(loss={loss}, grad_norm={grad_norm}); step skipped (train.nan_policy=skip)")
        else:
            last = (f"the last good checkpoint is {self.saved_path} (step {self.saved_step})" if self.saved_path
                    else "no checkpoint was written yet")
            raise TrainingDiverged(f"non-finite loss/grad norm at step {self.step + 1} (loss={loss}, "
                                   f"grad_norm={grad_norm}); stopped, {last}; lower train.lr or set "
                                   f"train.nan_policy=skip")
        self.optimizer.zero_grad(set_to_none=True)
        return reduced[1] > 0

    # -- logging, eval, checkpoints ------------------------------------------------------------------------------
    def _log_train(self) -> None:
        m, rt = self.meter, self.rt
        routing = routing_metrics(self.model, rt)  # MoE: expert_load and health per layer; {} otherwise
        steps = max(m["steps"], 1)
        tok_per_s = self.window_steps * self.tokens_per_step / self.window_time if self.window_time else 0.0
        rec = {"type": "train", "step": self.step, "tokens": self.step * self.tokens_per_step,
               "time": round(self.elapsed, 3), "loss": m["loss"] / steps if m["steps"] else float("nan"),
               "lr": lr_at(self.step - 1, self.cfg.train, self.max_steps), "grad_norm": m["grad_norm"] / steps,
               "tok_per_s": tok_per_s, "mfu": self.flops_per_token * tok_per_s / self.peak_flops}
        rec.update({k: v / steps for k, v in m["aux"].items()})  # MoE: aux_loss, z_loss (with coefficients)
        if m["skipped"]:
            rec["skipped"] = m["skipped"]
        rec.update(routing)
        self.meter, self.window_time, self.window_steps = self._new_meter(), 0.0, 0
        self.last_loss = rec["loss"]
        if not rt.is_main:
            return
        self.metrics.write(rec)
        self.tracker.log(rec, self.step)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{tok_per_s:,.0f}",
                             refresh=False)
        if self.bar.disable:
            print(f"step {self.step}/{self.max_steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                  f"grad_norm {rec['grad_norm']:.3f} tok/s {tok_per_s:,.0f} mfu {rec['mfu']:.1%}", flush=True)

    def _val_metrics(self, blocks) -> dict:
        from train.evaluate import eval_loss_sum, val_metrics

        rt = self.rt
        mine = blocks[rt.rank::rt.world_size]
        with eager(self.compile_mode):  # no autograd: compiled blocks would compile again for it
            nll, n = eval_loss_sum(self.model, mine, rt.device, rt.autocast)
            if rt.fsdp:  # every forward all-gathers parameters: each rank runs as many as the busiest (unused)
                self._idle_forwards(blocks, -(-len(blocks) // rt.world_size) - len(mine))
        nll, n = rt.all_reduce_sum([nll, float(n)])
        return val_metrics(nll, int(n), self.prepared, blocks.n_bytes if int(n) == blocks.n_tokens else None)

    @torch.no_grad()
    def _idle_forwards(self, blocks, count: int) -> None:
        """`count` evaluation forwards of the first block whose results are dropped: under FSDP a rank with fewer
        validation batches than the others must still join their parameter all-gathers."""
        if count <= 0:
            return
        was_training = self.model.training
        self.model.eval()  # as in eval_loss_sum: no routing counts, no dropout
        x_BT, y_BT = blocks[0]
        for _ in range(count):
            with self.rt.autocast():
                self.model(x_BT.to(self.rt.device), y_BT.to(self.rt.device))
        self.model.train(was_training)

    def _evaluate(self) -> dict:
        rt = self.rt
        self.last_val = self._val_metrics(self.val)
        self.eval_step = self.step
        if rt.is_main:
            rec = {"type": "eval", "step": self.step, "tokens": self.step * self.tokens_per_step,
                   "time": round(self.elapsed, 3), **self.last_val}
            self.metrics.write(rec)
            self.tracker.log(rec, self.step)
            self.bar.write(f"step {self.step}: val loss {rec['val_loss']:.4f}  ppl {rec['val_ppl']:.2f}  "
                           f"bpb {rec['val_bpb']:.4f}", file=sys.stdout)
        return self.last_val

    def _save(self) -> None:
        rngs = self.rt.gather(capture_rng())
        windows = self.rt.gather([layer.window_state() for layer in self.model.moe_layers()])  # per rank (rank 0)
        # every rank takes part (fsdp gathers the full weights and optimizer state onto rank 0); rank 0 writes
        tensors, optimizer = model_state(self.model), optimizer_state(self.optimizer, self.model)

        def write() -> str:
            loads = [[w["load_counts"] for w in rank] for rank in windows]
            state = {"step": self.step, "tokens": self.step * self.tokens_per_step, "elapsed": self.elapsed,
                     "optimizer": optimizer,
                     "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                     "rng": rngs, "meter": self.meter, "wandb_id": self.wandb_id,
                     "expert_load_counts": loads[0], "expert_load_counts_per_rank": loads,
                     "moe_windows_per_rank": windows,
                     "world_size": self.rt.world_size, "loader": {"seed": self.cfg.train.seed, "step": self.step},
                     "scheduler": {"step": self.step, "max_steps": self.max_steps}}
            path = ck.save_checkpoint(self.run_dir, self.step, self.model, state, self.config_dict,
                                      self.cfg.train.keep_last, tensors)
            return str(path)

        self.saved_path = self.rt.on_main(write)
        self.saved_step = self.step

    def _finish(self) -> dict:
        from train.data import load_tokenizer
        from train.evaluate import generate_samples

        t, rt = self.cfg.train, self.rt
        if self.eval_step != self.step:
            self._evaluate()
        if self.saved_step != self.step:
            self._save()
        tune = {}
        if self.val_tune is not None:
            m = self._val_metrics(self.val_tune)
            tune = {"tune_loss": m["val_loss"], "tune_bpb": m["val_bpb"], "tune_tokens": m["val_tokens"]}
        final = {"type": "final", "step": self.step, "tokens": self.step * self.tokens_per_step,
                 "time": round(self.elapsed, 3), **self.last_val, **tune, "train_loss": self.last_loss,
                 "params": self.counts["total"], "active_params": self.counts["active"],
                 "tok_per_s": getattr(self, "session_tokens", 0) / max(getattr(self, "session_time", 0.0), 1e-9),
                 "run_dir": str(self.run_dir), "wandb_id": self.wandb_id,
                 "wandb_dir": self.tracker.dir if self.tracker else None}
        sampler = unsharded_copy(self.model, self.cfg.model, self.rt)
        if rt.is_main:
            with eager(self.compile_mode):  # one token at a time with a KV cache: new shapes every call
                samples = generate_samples(sampler, load_tokenizer(self.run_dir / "tokenizer.json"),
                                           t.sample_prompts, t.sample_max_new_tokens, t.sample_temperature,
                                           t.sample_top_k, t.seed, rt.device, self.prepared.eos_id)
            write_samples(self.run_dir, samples, self.step)
            self.tracker.samples_table(samples, self.step)
            self.metrics.write(final)
            self.tracker.summary({k: v for k, v in final.items() if k != "type"})
            print(f"done: step {self.step}, val loss {final.get('val_loss', float('nan')):.4f}, "
                  f"bpb {final.get('val_bpb', float('nan')):.4f}, {final['tok_per_s']:,.0f} tok/s -> {self.run_dir}",
                  flush=True)
        return final

    def close(self, failed: bool = False) -> None:
        if self.tracker is not None:
            self.tracker.finish(exit_code=1 if failed else 0)
        if self.lock is not None:
            self.lock.release()

