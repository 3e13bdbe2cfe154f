"""A fork server for fault-injection tests (tests/test_faults.py): real `scripts/train.py` runs that start in a
fraction of a second, and faults placed at exact points inside them.

`Zygote` starts this file as a process (`python tests/faultkit.py --zygote`) that imports torch and the trainer once;
each run is then forked from it and executes scripts/train.py with runpy, as `python scripts/train.py ARGS` would. A
forked child is a real process: it is SIGKILLed, signalled, limited and exits like any other, and its stdout/stderr
go to files the test reads while it runs. `_install_fault` patches the child only (never the test process), so that
the n-th occurrence of one event SIGKILLs it at an exact point (half of state.pt written, a manifest written but not
yet renamed, ...) or makes a value non-finite.
"""
from __future__ import annotations

import json
import os
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"


class Child:
    def __init__(self, zygote: "Zygote", pid: int, out: Path):
        self.zygote, self.pid, self.out, self.rc = zygote, pid, out, None

    def stdout(self) -> str:
        return self.out.with_suffix(".out").read_text(errors="replace")

    def stderr(self) -> str:
        return self.out.with_suffix(".err").read_text(errors="replace")

    def alive(self) -> bool:
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stdout():
            assert self.alive() and time.monotonic() < deadline, f"no {text!r} in the output: {self.stderr()[-800:]}"
            time.sleep(0.005)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)

    def kill_after(self, seconds: float, or_once: str) -> None:
        """SIGKILL after `seconds`, or as soon as `or_once` appears in the output if that comes first (so that how
        far a run gets before the kill does not depend on the speed of the machine)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and or_once not in self.stdout():
            time.sleep(0.002)
        self.kill()

    def wait(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while self.rc is None and self.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.rc is None:
            if self.alive():
                self.kill()
            self.rc = self.zygote.request({"wait": self.pid})
            assert time.monotonic() < deadline, f"run did not finish in {timeout} s (killed): {self.stderr()[-800:]}"
        return self.rc


class Zygote:
    """Forks runs of scripts/train.py with `base_args` + the given arguments."""

    def __init__(self, tmp: Path, base_args: list[str]):
        self.tmp, self.base_args, self.children = tmp, base_args, []
        self.proc = subprocess.Popen([sys.executable, __file__, "--zygote"], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def request(self, job: dict) -> int:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, *args: str, fault: dict | None = None, env: dict | None = None, unset=(),
              file_size_limit: int | None = None) -> Child:
        """A run in its own process. fault: {"kind": ..., "nth": n} (see _install_fault); env/unset: environment
        changes; file_size_limit: RLIMIT_FSIZE in bytes (a full disk, as far as the run can tell)."""
        out = self.tmp / f"child{len(self.children) + 1}"
        pid = self.request({"args": [*self.base_args, *map(str, args)], "out": str(out), "fault": fault,
                            "env": env or {}, "unset": list(unset), "fsize": file_size_limit})
        self.children.append(Child(self, pid, out))
        return self.children[-1]

    def run(self, *args: str, **kw) -> Child:
        child = self.start(*args, **kw)
        child.wait()
        return child

    def close(self) -> None:
        for child in self.children:  # e.g. left running by a failed test: stop and reap it
            if child.rc is None:
                if child.alive():
                    child.kill()
                child.rc = self.request({"wait": child.pid})
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _zygote_main() -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    import torch  # noqa: F401  everything a run imports, so that a forked child starts at once
    import model.model_minimind, train.data, train.evaluate, train.trainer, safetensors.torch, tqdm  # noqa: F401
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # imports torch._dynamo (seconds)
    print("ready", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        if "wait" in job:
            _, status = os.waitpid(job["wait"], 0)
            print(os.waitstatus_to_exitcode(status), flush=True)  # -N: killed by signal N
            continue
        # the output files exist before the child runs, so the test can read them as soon as it has the pid
        outputs = [os.open(job["out"] + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                   for suffix in (".out", ".err")]
        pid = os.fork()
        if pid == 0:
            _child_main(job, outputs)  # leaves by SystemExit (or a signal), never returns here
        for fd in outputs:
            os.close(fd)
        print(pid, flush=True)


def _child_main(job: dict, outputs: list[int]) -> None:
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, f in zip((1, 2), outputs):
        os.dup2(f, fd)
        os.close(f)
    os.environ.update(job["env"])
    for key in job["unset"]:
        os.environ.pop(key, None)
    if job["fsize"]:
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
    if job["fault"]:
        _install_fault(**job["fault"])
    sys.argv = [str(TRAIN), *job["args"]]
    runpy.run_path(str(TRAIN), run_name="__main__")
    sys.exit(0)


def _install_fault(kind: str, nth: int = 1) -> None:
    """Make the n-th occurrence of one event SIGKILL this process (or misbehave), in a forked child only."""
    from train import checkpoint as ck

    calls = [0]

    def hit() -> bool:
        calls[0] += 1
        return calls[0] == nth

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kind in ("weights_half", "state_half", "config_half"):  # a file cut short mid-write
        prefix = {"weights_half": ck.WEIGHTS, "state_half": ck.STATE, "config_half": ".config.yaml.tmp"}[kind]
        real_write = ck._write_bytes

        def write(path, data):
            if Path(path).name.startswith(prefix) and hit():
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                die()
            real_write(path, data)
        ck._write_bytes = write
    elif kind in ("manifest_written", "renamed"):  # files + manifest complete but not renamed / renamed, unpublished
        real_fsync = ck._fsync_dir

        def fsync_dir(path):
            real_fsync(path)
            name = Path(path).name
            if (name.startswith(".tmp-step") if kind == "manifest_written" else name == ck.CKPT_SUBDIR) and hit():
                die()
        ck._fsync_dir = fsync_dir
    elif kind == "published_weights":  # top-level model.safetensors is new, state.pt still the previous step's
        real_publish = ck._publish

        def publish(src, dst):
            real_publish(src, dst)
            if dst.name == ck.WEIGHTS and hit():
                die()
        ck._publish = publish
    elif kind == "pruning":  # an old checkpoint renamed aside and half deleted
        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if Path(path).name.startswith(".trash-") and hit():
                next(p for p in Path(path).iterdir()).unlink()
                die()
            real_rmtree(path, *args, **kwargs)
        shutil.rmtree = rmtree
    elif kind == "metrics_half_line":
        from train.tracking import MetricsLog
        real_log = MetricsLog.write

        def log(self, record):
            if hit():
                with open(self.path, "a") as f:
                    f.write(json.dumps(record)[:25])
                die()
            real_log(self, record)
        MetricsLog.write = log
    elif kind in ("inf_loss", "inf_grad"):  # the n-th training micro-batch: loss = inf / finite loss, inf gradient
        import torch
        from model.model_minimind import MiniMindForCausalLM

        class InfGrad(torch.autograd.Function):
            forward = staticmethod(lambda ctx, x: x.clone())
            backward = staticmethod(lambda ctx, g: g * float("inf"))

        real_forward = MiniMindForCausalLM.forward

        def forward(self, *args, **kwargs):
            out = real_forward(self, *args, **kwargs)
            if self.training and hit():
                out.loss = out.loss * float("inf") if kind == "inf_loss" else InfGrad.apply(out.loss)
            return out
        MiniMindForCausalLM.forward = forward
    elif kind == "data_val_half":  # the data cache: train.bin in place, val.bin cut short mid-write
        from train.data import shards
        real_split = shards._write_split

        def write_split(ds, tokenizer, eos_id, dtype, path, split, *args):
            if split == "val" and hit():
                Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}").write_bytes(b"\0" * 1000)
                die()
            return real_split(ds, tokenizer, eos_id, dtype, path, split, *args)
        shards._write_split = write_split
    elif kind == "data_before_meta":  # every shard written, meta.json (the completion mark) not yet
        from train.data import shards
        real_atomic = shards._atomic_write_bytes

        def atomic(path, data):
            if Path(path).name == "meta.json" and hit():
                die()
            real_atomic(path, data)
        shards._atomic_write_bytes = atomic
    elif kind == "wandb_log_fails":  # the network goes away mid-run
        from wandb.sdk.wandb_run import Run
        real_log = Run.log

        def log(self, *args, **kwargs):
            if calls[0] >= nth - 1:
                raise ConnectionError("network went away")
            calls[0] += 1
            return real_log(self, *args, **kwargs)
        Run.log = log
    else:
        raise ValueError(kind)



if __name__ == "__main__" and sys.argv[1:] == ["--zygote"]:
    _zygote_main()
