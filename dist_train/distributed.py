"""Who am I (single process, torchrun, srun), which device, and the few collectives the loop needs.

World size 1 needs no process group: every collective here is a no-op there, so the loop has no
`if ddp:` branches.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_train import exits, processes
from dist_train.config import UserError
from dist_train.errors import environment_int


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def discover_ranks(environ=os.environ) -> tuple[int, int, int]:
    """(rank, local_rank, world_size): torchrun's variables win, then srun's, else (0, 0, 1).
    Values that cannot be a launcher's are a UserError naming the variable."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    elif in_srun_step(environ):
        names = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")
    else:
        return 0, 0, 1
    rank, local_rank = environment_int(environ, names[0]), environment_int(environ, names[1], default=0)
    world_size = environment_int(environ, names[2], minimum=1)
    if rank >= world_size:
        raise UserError(f"{names[0]}={rank} is not below {names[2]}={world_size}: a rank is 0 to world size - 1")
    if names[0] == "RANK" and world_size > 1:  # srun's ranks derive the address (slurm_master_addr_port)
        if not environ.get("MASTER_ADDR"):
            raise UserError(f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: launch with torchrun, "
                            "or unset RANK and WORLD_SIZE to run one process")
        master_port(environ)
    return rank, local_rank, world_size


def check_master_addr(host: str) -> None:
    """A MASTER_ADDR that names no host: torch's store client would retry it for the whole
    10 min timeout. A lookup that may succeed later (DNS not answering) is left to torch."""
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror as error:
        if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise RankError(f"MASTER_ADDR={host!r} in the environment names no host ({error.strerror}): set it to "
                            "the main rank's host name or address") from None


def tell_torchrun(line: str, environ=os.environ) -> None:
    """Under torchrun: `line` into this rank's error file (TORCHELASTIC_ERROR_FILE), which the
    agent reads when the rank exits non-zero and prints in its failure summary (a message given as
    a string is shown as it is). Best effort: the line was printed already. torchrun names a file
    that does not exist yet; an existing file (the variable set by hand to something else) is
    never overwritten."""
    path = environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "x") as f:
            json.dump({"message": line, "timestamp": str(int(time.time()))}, f)
    except OSError:
        pass


def tell_relaunch(exit_code: int, environ=os.environ) -> None:
    """Under slurm/relaunch.sh (which sets DIST_TRAIN_EXIT_FILE, on the shared filesystem): a code
    that a relaunch would only repeat (exits.PERMANENT: a user error, divergence...) into that file.
    torchrun exits 1 whatever its ranks exited with, so from the step's code alone relaunch.sh
    would relaunch a user error 10 times (times torchrun's own restarts). relaunch.sh removes the
    file before each launch; one that exists (the first rank's, or a file named by hand) is never
    overwritten. Best effort."""
    path = environ.get("DIST_TRAIN_EXIT_FILE")
    if not path or exit_code not in exits.PERMANENT:
        return
    try:
        with open(path, "x") as f:
            f.write(f"{exit_code}\n")
    except OSError:
        pass


def master_port(environ) -> int:
    port = environment_int(environ, "MASTER_PORT", minimum=1)
    if port > 65535:
        raise UserError(f"MASTER_PORT={environ['MASTER_PORT']!r} in the environment is not a port (1 to 65535)")
    return port


def in_srun_step(environ=os.environ) -> bool:
    """Inside a task launched by srun (not the batch script itself, whose SLURM_NTASKS is the job's)."""
    return "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ and "SLURM_NTASKS" in environ


def slurm_master_addr_port(environ=os.environ) -> tuple[str, str]:
    """The first host of the job's node list, and a port derived from the job id, unless set."""
    addr = environ.get("MASTER_ADDR")
    if not addr:
        hosts = subprocess.run(["scontrol", "show", "hostnames", environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        addr = hosts[0]
    if environ.get("MASTER_PORT"):
        return addr, str(master_port(environ))
    return addr, str(15000 + environment_int(environ, "SLURM_JOB_ID", default=0) % 20000)


def device_type(choice: str) -> str:
    """"cuda" or "cpu", as setup() will pick for this --device, without making a CUDA context."""
    return "cpu" if choice == "cpu" or not torch.cuda.is_available() else "cuda"


def pick_device(choice: str, local_rank: int, num_visible: int, num_node_gpus: int | None = None,
                why_no_cuda: str = "") -> torch.device:
    """The device of this rank, from what it can see (a pure function, so tests need no GPU).

    num_visible: the CUDA devices this process sees (torch.cuda.device_count()).
    num_node_gpus: the GPUs SLURM gave all tasks of this node together, where known. When a
    task sees fewer (--gpus-per-task, --gpu-bind), each task has its own subset and its rank
    takes cuda:(LOCAL_RANK % visible); otherwise every rank sees the node's GPUs and takes
    cuda:LOCAL_RANK, which must exist: nccl needs one GPU per rank. A node SLURM gave GPUs to whose
    torch sees none (a CPU-only wheel, a driver too old for torch's CUDA: why_no_cuda) is an
    error, not a run on the CPU for the whole allocation."""
    if choice == "cpu":
        return torch.device("cpu")
    if num_visible == 0:
        why = f" ({why_no_cuda})" if why_no_cuda else ""
        if num_node_gpus:
            raise RankError(f"SLURM gave this node {num_node_gpus} GPU(s) but torch sees none{why}; training would "
                            "run on the CPU: install a torch that sees them, or pass --device cpu to train on the CPU")
        if choice == "cuda":
            raise UserError(f"--device cuda was asked for but CUDA is not available here{why}; use --device cpu")
        return torch.device("cpu")
    if num_node_gpus is not None and num_visible < num_node_gpus:
        return torch.device("cuda", local_rank % num_visible)
    if local_rank >= num_visible:
        raise RankError(f"local rank {local_rank} has no GPU of its own: this process sees {num_visible} "
                        f"GPU(s), and nccl needs one GPU per rank; start at most {num_visible} ranks per "
                        "node (--nproc_per_node, --ntasks-per-node) or bind one GPU per task (--gpus-per-task=1)")
    return torch.device("cuda", local_rank)


class RankError(UserError):
    """A user error that only some ranks see (their own device): each reports it, not only rank 0."""


def gpus_given_to_node(environ=os.environ) -> int | None:
    """How many GPUs SLURM gave this node's tasks together (SLURM_STEP_GPUS, else SLURM_JOB_GPUS)."""
    ids = environ.get("SLURM_STEP_GPUS") or environ.get("SLURM_JOB_GPUS")
    return len([i for i in ids.split(",") if i.strip()]) if ids else None


def use_deterministic_kernels(device: torch.device) -> None:
    """Deterministic kernels, and an error (not a warning) from any op that has none: a silently
    non-deterministic kernel would break the bit-exact resume. cuBLAS needs its workspace setting
    before its first use."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def nondeterministic_op(error: BaseException) -> str | None:
    """The op named by torch's 'does not have a deterministic implementation' error, else None."""
    text = str(error)
    if "does not have a deterministic implementation" not in text:
        return None
    return text.split(" does not have a deterministic implementation", 1)[0].strip().split()[-1]


def this_ranks_device(device_choice: str) -> torch.device:
    """pick_device for this process; run before the run directory exists, its refusals are
    one line with nothing created. Makes no CUDA context."""
    _, local_rank, _ = discover_ranks()
    num_visible = torch.cuda.device_count() if device_choice != "cpu" and torch.cuda.is_available() else 0
    why = "" if num_visible or device_choice == "cpu" else why_no_cuda()
    return pick_device(device_choice, local_rank, num_visible, gpus_given_to_node(), why)


def why_no_cuda() -> str:
    """Why this torch sees no GPU, as far as it says."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and not hidden.strip():
        return "CUDA_VISIBLE_DEVICES is empty"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, and no GPU is available to it: no "
            "driver, or one too old for that CUDA")


def setup(device_choice: str, deterministic: bool = True) -> DistEnv:
    """Pick the device, join the process group (gloo on CPU, nccl on CUDA) when world size > 1."""
    rank, local_rank, world_size = discover_ranks()
    device = this_ranks_device(device_choice)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if deterministic:
        use_deterministic_kernels(device)
    if world_size > 1:
        if "RANK" not in os.environ:  # ranks from srun: init_process_group needs the rendezvous address
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = slurm_master_addr_port()
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        processes.finalizing_is_unsafe()  # its threads may outlive it (processes.leave)
        dist.init_process_group(backend, store=attempt_store(rank, world_size), rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(minutes=10), **kwargs)
    return DistEnv(rank, local_rank, world_size, device)


def describe_placement(env: DistEnv) -> str:
    """Where this rank runs: device, CPUs it may use, threads (what SLURM binding decides)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"rank {env.rank}/{env.world_size} on {socket.gethostname()}: device {env.device}, {cpus} CPUs, "
            f"{torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")


def attempt_store(rank: int, world_size: int):
    """The env:// rendezvous store, under a prefix of torchrun's restart count.

    torchrun keeps one store across restarts of a worker group; without a per-attempt prefix a
    restarted rank can read the previous attempt's addresses and fail to connect (seen with
    torch 2.14 and gloo when ranks start at different times)."""
    check_master_addr(os.environ.get("MASTER_ADDR", ""))
    try:
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size,
                                           timeout=datetime.timedelta(minutes=10)))
    except dist.DistNetworkError as error:
        if "EADDRINUSE" not in str(error):
            raise
        # The main rank serves the store on MASTER_PORT (srun's: derived from the job id): another
        # run or job on this host holds it.
        raise UserError(f"MASTER_PORT={os.environ.get('MASTER_PORT')} is in use on {socket.gethostname()} "
                        "(another run or job on this host listens on it): set MASTER_PORT to a free port "
                        "(in the job script under srun)") from None
    return dist.PrefixStore(f"dist_train/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)


def side_store(timeout: float):
    """A second client of the rendezvous store, with its own (short) timeout, for the watchdog:
    its beats must fail fast when the store's host is gone, not after the process group's 10 min."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)
    return dist.PrefixStore(f"dist_train/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/healing", store)


def teardown(env: DistEnv) -> None:
    """Destroy the process group, then give gloo's worker threads a moment (0.2 s) to drop what they
    still hold of the last collectives before the interpreter finalizes: a worker thread that
    releases a tensor then needs the GIL, and one that asks for it during finalization is ended by
    Python inside C++ code that may not unwind: "terminate called without an active exception",
    SIGABRT, exit 134 after a complete run (core dump: gloo's thread in THPVariable_dealloc ->
    take_gil -> PyThread_exit_thread -> std::terminate). Seen in 1 of 12 and 1 of 8 runs of
    tests/test_distributed_save.py. The entry points also end without finalizing (processes.leave);
    this wait is for callers of train.main() that finalize as usual."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(0.2)  # the GIL is free meanwhile


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few floats over all ranks (float64, so the sum does not depend on the rank count)."""
    if not env.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_to_main(obj, env: DistEnv) -> list | None:
    """Every rank's `obj`, in rank order, on the main rank; None elsewhere."""
    if not env.distributed:
        return [obj]
    gathered = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_main(obj, env: DistEnv):
    """The main rank's `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
