"""The tests/ops/test_*_cuda.py checks that an op runs on the current CUDA stream: its result on a
side stream (ordered after the work queued so far, and before what is queued after) is the one it
gives on the default stream."""
import torch


def on_a_side_stream(fn):
    """fn() run with a new stream current: that stream first waits for the current one, and the
    current one then waits for it, so what fn() returns is ready to read on the current stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = fn()
    torch.cuda.current_stream().wait_stream(side)
    return result
