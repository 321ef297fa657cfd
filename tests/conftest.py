import os

# The Triton kernel tests run on the CPU through Triton's interpreter unless QSC_TEST_DEVICE names
# a GPU (tests/devices.py). Triton reads this variable when a kernel is decorated, i.e. when
# qsc.kernels.* is first imported, so it is set here, before any test module is collected. It
# changes nothing for code that does not use Triton.
if os.environ.get("QSC_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist every worker would take all the cores for torch's intra-op threads: two
# workers on two cores then run four threads that preempt each other. Each worker takes its share.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads() // workers))
