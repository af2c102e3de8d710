"""The sweep's launchers: local (in turn, or --parallel at a time, one GPU set each), torchrun
(--nproc_per_node per point) and slurm through submitit.

Every launcher runs the point's `python -m trex_fast.train` command in the point's run
directory; continuing an interrupted point is training's own resume (output_dir/checkpoint.pt).
A stop is always a SIGTERM to the training processes, which save a checkpoint after the current
step: the local launchers forward the SIGTERM/SIGINT the sweep gets; a Slurm job that is
preempted or reaches its time limit gets submitit's signal, stops its trainer the same way and
is requeued, and the requeued job resumes.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from pipelines import atomic
from trex_fast.cli import check_choice
from trex_fast.sweep.points import Point, SweepError

LAUNCHERS = ("local", "torchrun", "slurm")
CLUSTERS = ("slurm", "local", "debug")  # submitit executors; local/debug need no Slurm
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
END_GRACE_S = 120.0  # a trainer's time to save after SIGTERM when the sweep ends, then SIGKILL


@dataclass(frozen=True)
class LaunchSettings:
    launcher: str = "local"
    parallel: int = 1  # local/torchrun: points at a time
    gpus: str = ""  # local/torchrun: GPU ids to share out, "0,1,2,3"; default 0..N-1
    nproc_per_node: int = 1  # torchrun
    nodes: int = 1  # slurm
    gpus_per_node: int = 1  # slurm: one training process (task) per GPU
    partition: str = ""
    time_min: int = 4320
    account: str = ""
    cluster: str = "slurm"
    wait: bool = True

    def __post_init__(self):
        check_choice("launcher", self.launcher, LAUNCHERS, SweepError)
        check_choice("cluster", self.cluster, CLUSTERS, SweepError)
        for name in ("parallel", "nproc_per_node", "nodes", "time_min"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise SweepError(f"--{name}={getattr(self, name)!r}: must be an integer >= 1")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            raise SweepError(f"--gpus_per_node={self.gpus_per_node!r}: must be an integer >= 0")

    def world_size(self) -> int:
        """Training processes per point (make_config's memory-size check needs it)."""
        if self.launcher == "torchrun":
            return self.nproc_per_node
        if self.launcher == "slurm":
            return self.nodes * self.tasks_per_node()
        return 1

    def tasks_per_node(self) -> int:
        return max(1, self.gpus_per_node)  # 0 GPUs: one CPU process


def train_command(point: Point, settings: LaunchSettings) -> list[str]:
    train = ["-m", "trex_fast.train", *point.train_argv()]
    if settings.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={settings.nproc_per_node}", *train]
    return [sys.executable, *train]  # local, and each task of a Slurm job


def child_env(extra: dict | None = None) -> dict:
    """The sweep's environment, with this checkout first on the path: points train with the
    code that validated them."""
    path = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def gpu_slots(settings: LaunchSettings) -> list[dict]:
    """One environment override per concurrent point: its own CUDA_VISIBLE_DEVICES."""
    per_point = settings.nproc_per_node if settings.launcher == "torchrun" else 1
    if settings.parallel == 1 and not settings.gpus:
        return [{}]  # one point at a time sees every GPU the sweep sees
    ids = ([g.strip() for g in str(settings.gpus).split(",") if g.strip()] if settings.gpus
           else [str(i) for i in range(settings.parallel * per_point)])
    if len(ids) < settings.parallel * per_point:
        raise SweepError(f"--parallel={settings.parallel} x {per_point} GPU(s) per point needs "
                         f"{settings.parallel * per_point} GPUs; --gpus gives {len(ids)}")
    return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[i * per_point:(i + 1) * per_point])}
            for i in range(settings.parallel)]


# ---------------------------------------------------------------------------------------------
# local and torchrun: subprocesses, a fixed number at a time
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    name: str
    argv: list
    log_path: str


def _stop_with_parent() -> None:
    """In a point's process, before it runs: SIGTERM when the sweep dies, even by SIGKILL
    (Linux's parent-death signal), so a killed sweep leaves no orphan trainer (issue #26)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the sweep's own exit path still ends it
        pass


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:  # it ended between the poll and the signal
            pass


def end_jobs(procs: list[subprocess.Popen], grace_s: float = END_GRACE_S) -> None:
    """End running points' process groups: SIGTERM (they save and exit), then SIGKILL for a
    group still there after grace_s."""
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def run_jobs(jobs: list[Job], slots: list[dict], poll_s: float = 0.2) -> dict[str, int]:
    """Run jobs, len(slots) at a time, each with its slot's environment; returns exit codes.

    A SIGTERM or SIGINT to the sweep is passed on as SIGTERM to every running job's process
    group (its loader workers, torchrun's workers), which checkpoint and exit; then the sweep
    exits too, without starting more. Rerunning the sweep continues them. However else the
    sweep ends (an error, or killed: see _stop_with_parent), its jobs end with it."""
    queue, running, codes = list(jobs), {}, {}
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        for proc, _ in running.values():
            _signal_group(proc, signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while queue or running:
            free = [i for i in range(len(slots)) if i not in running]
            while free and queue and not received:
                job, slot = queue.pop(0), free.pop(0)
                os.makedirs(os.path.dirname(job.log_path), exist_ok=True)
                log = open(job.log_path, "a")
                print(f"[trex_fast.sweep] start {job.name} {slots[slot] or ''}", flush=True)
                proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT,
                                        env=child_env(slots[slot]), start_new_session=True,
                                        preexec_fn=_stop_with_parent)
                running[slot] = (proc, job)
                log.close()  # the child holds its own descriptor
            for slot, (proc, job) in list(running.items()):
                if proc.poll() is not None:
                    codes[job.name] = proc.returncode
                    print(f"[trex_fast.sweep] end {job.name}: exit {proc.returncode}", flush=True)
                    del running[slot]
            if received and not running:
                break
            time.sleep(poll_s)
    finally:
        end_jobs([proc for proc, _ in running.values()])  # only left on an error
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        print(f"[trex_fast.sweep] stopped by {signal.Signals(received[0]).name}; rerun the same "
              "command to continue", flush=True)
        sys.exit(128 + received[0])
    return codes


# ---------------------------------------------------------------------------------------------
# slurm: one submitit job per point, one task per GPU
# ---------------------------------------------------------------------------------------------
class PointJob:
    """One point as a submitit job. Each task runs one training process with its rank in the
    environment (torchrun's variables, from submitit's JobEnvironment).

    checkpoint() is submitit's hook when the job is preempted or times out: the trainer gets
    SIGTERM, saves its checkpoint after the current step and exits; the job is requeued with
    this same callable, and training resumes from that checkpoint."""

    def __init__(self, name: str, argv: list[str], run_dir: str):
        self.name, self.argv, self.run_dir = name, argv, run_dir
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> int:
        import submitit

        env = submitit.JobEnvironment()
        rank_env = {}
        if env.num_tasks > 1:
            job_digits = "".join(c for c in str(env.job_id) if c.isdigit()) or "0"
            rank_env = {"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks),
                        "LOCAL_RANK": str(env.local_rank),
                        "LOCAL_WORLD_SIZE": str(env.num_tasks // env.num_nodes),
                        "MASTER_ADDR": env.hostnames[0],
                        "MASTER_PORT": str(20000 + int(job_digits) % 20000)}
        log_name = "train.log" if env.global_rank == 0 else f"train.rank{env.global_rank}.log"
        with open(os.path.join(self.run_dir, log_name), "a") as log:
            proc = self._proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                                 env=child_env(rank_env))
            code = proc.wait()
        if code != 0:
            raise RuntimeError(f"{self.name}: training exited with {code}; see "
                               f"{os.path.join(self.run_dir, log_name)}")
        return code

    def checkpoint(self):
        from submitit.core.utils import DelayedSubmission

        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)  # the trainer saves after this step
            self._proc.wait()
        self._proc = None  # a live process does not pickle; the requeued job starts its own
        return DelayedSubmission(self)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_proc": None}


def submit_slurm(points: list[Point], settings: LaunchSettings, output_dir: str) -> list[str]:
    """Submit one job per point; with settings.wait, wait for them. Returns the failed points."""
    import submitit

    executor = submitit.AutoExecutor(folder=os.path.join(output_dir, "submitit", "%j"),
                                     cluster=settings.cluster)
    params = dict(nodes=settings.nodes, tasks_per_node=settings.tasks_per_node(),
                  gpus_per_node=settings.gpus_per_node, timeout_min=settings.time_min,
                  slurm_signal_delay_s=120)  # time to save a checkpoint before the kill
    if settings.partition:
        params["slurm_partition"] = settings.partition
    if settings.account:
        params["slurm_account"] = settings.account
    jobs = []
    for point in points:
        executor.update_parameters(name=f"trex_fast.{point.name}", **params)
        job = executor.submit(PointJob(point.name, train_command(point, settings), point.run_dir))
        print(f"[trex_fast.sweep] submitted {point.name}: job {job.job_id}", flush=True)
        atomic.write_bytes(os.path.join(point.run_dir, "job_id"), f"{job.job_id}\n".encode())
        jobs.append((point, job))
    if not settings.wait:
        return []
    failed = []
    for point, job in jobs:
        try:
            job.result()
        except Exception as e:  # a job's failure is reported; the other points still count
            print(f"[trex_fast.sweep] {point.name}: {e}", file=sys.stderr, flush=True)
            failed.append(point.name)
    return failed


def launch(points: list[Point], settings: LaunchSettings, output_dir: str) -> list[str]:
    """Run the points that are not finished; returns the names of those that failed."""
    if settings.launcher == "slurm":
        return submit_slurm(points, settings, output_dir)
    jobs = [Job(p.name, train_command(p, settings), os.path.join(p.run_dir, "train.log"))
            for p in points]
    codes = run_jobs(jobs, gpu_slots(settings))
    return [name for name, code in codes.items() if code != 0]


def settings_dict(settings: LaunchSettings) -> dict:
    return dataclasses.asdict(settings)
