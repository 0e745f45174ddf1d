"""--cuda-graph: the whole training step captured once into a CUDA graph and replayed after.

A step is a few hundred kernel launches (student and teacher forward, loss, backward, clipping,
AdamW). Where the host takes longer to issue them than the GPU to run them, the GPU waits: our
DeiT-Ti fwd+bwd took 37.6 ms on an H200 against timm's 29.0 (bench.models, 2026-11-26), and the
benches' CUDA-graph replays time every op without that host time. Replayed from a graph, a step
costs the host one launch.

What stays eager around the replay: the batch's copy into the graph's input buffers (after
mixup, which draws its lambda on the host), the lr of each param group written into a device
tensor that the captured AdamW reads, the EMA update (its decay depends on the step) and the
logging. Per-step reseeding keeps working: a replay reads the generator's seed and offset then.
The first WARMUP_STEPS steps of a process run eagerly on a side stream (cuDNN's benchmark, Triton's
compiles, AdamW's lazily made state, as torch.cuda.graph asks), then one step is captured.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

WARMUP_STEPS = 3


class CannotCapture(ValueError):
    """A run that --cuda-graph cannot capture, or a batch its graph cannot take."""


def check(args, device: torch.device, world: int) -> None:
    """Refuse, naming --cuda-graph, a run whose step cannot be captured; before any work."""
    if not args.cuda_graph:
        return
    problems = []
    if device.type != "cuda":
        problems.append(f"needs a CUDA device, not {device}")
    if args.precision == "fp16":
        problems.append("fp16's GradScaler reads found_inf on the host every step: use --precision "
                        "bf16 or fp32")
    if args.compile:
        problems.append("--compile makes its own graphs: use --compile --compile-mode reduce-overhead")
    if world > 1:
        problems.append(f"runs one process, not {world}: DDP's all-reduce is not captured")
    if problems:
        raise CannotCapture("--cuda-graph: " + "; ".join(problems))


def capture_cuda_graph(fn: Callable[[], Sequence[Tensor]]) -> Callable[[], Sequence[Tensor]]:
    """Record fn's kernels into a CUDA graph (running none of them); returns replay(), which runs
    them and returns fn's outputs: the same tensors every time, overwritten by each replay."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: the DataLoader's pin-memory thread allocates pinned memory meanwhile, which
    # the default "global" mode would forbid to every thread during the capture.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # syncs, empties the cache
        outputs = fn()

    def replay():
        graph.replay()
        return outputs
    return replay


class GraphedStep:
    """step(samples, targets) -> (loss, base, distill), replayed from one CUDA graph after
    `warmup` eager calls. The step must run the optimizer; its outputs are overwritten by the next
    call, so read them (or copy them) before it. `capture` records the step: capture_cuda_graph
    (tests swap in one whose replay runs the step itself, to check the input buffers and the lr
    tensors on a CPU)."""

    def __init__(self, step: Callable[[Tensor, Tensor], Tuple[Tensor, ...]],
                 optimizer: torch.optim.Optimizer, warmup: int = WARMUP_STEPS,
                 capture: Optional[Callable] = None):
        self.step, self.optimizer, self.warmup = step, optimizer, warmup
        self.capture = capture or capture_cuda_graph
        self.calls = 0
        self.replay: Optional[Callable[[], Sequence[Tensor]]] = None
        self.inputs: Tuple[Tensor, Tensor] = ()
        self.lrs: List[Tensor] = []  # one device tensor per param group: what the graph reads
        self.side: Optional[torch.cuda.Stream] = None  # the warm-up's stream

    def __call__(self, samples: Tensor, targets: Tensor) -> Tuple[Tensor, ...]:
        self.calls += 1
        if self.replay is None and self.calls <= self.warmup:
            return self._on_side_stream(samples.device, lambda: self.step(samples, targets))
        if self.replay is None:
            self._capture(samples, targets)
        for new, static in zip((samples, targets), self.inputs):
            if new.shape != static.shape or new.dtype != static.dtype:
                raise CannotCapture(
                    f"--cuda-graph: a batch of {tuple(new.shape)} {new.dtype} after the capture at "
                    f"{tuple(static.shape)} {static.dtype}: every step must have the captured shapes")
            static.copy_(new)
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])  # the scheduler's float for this step
        return tuple(self.replay())

    def _on_side_stream(self, device: torch.device, fn):
        if device.type != "cuda":
            return fn()
        if self.side is None:
            self.side = torch.cuda.Stream(device)
        current = torch.cuda.current_stream(device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            out = fn()
        current.wait_stream(self.side)
        return out

    def _capture(self, samples: Tensor, targets: Tensor) -> None:
        self.inputs = (samples.clone(), targets.clone())
        self.lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=samples.device)
                    for g in self.optimizer.param_groups]
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates them
        self.replay = self.capture(self._step_on_buffers)

    def _step_on_buffers(self) -> Tuple[Tensor, ...]:
        """The step on the input buffers, with AdamW reading lr from the tensors (a float would be
        baked into the graph); the groups get their floats back for the scheduler and state_dict."""
        groups = self.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        for g, lr in zip(groups, self.lrs):
            g["lr"] = lr
        try:
            return tuple(self.step(*self.inputs))
        finally:
            for g, lr in zip(groups, floats):
                g["lr"] = lr
