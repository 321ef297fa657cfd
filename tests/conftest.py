import os

# The Triton kernel tests run on the CPU through Triton's interpreter. Triton reads this variable
# when a kernel is decorated, i.e. when qsc.kernels.* is first imported, so it is set here, before
# any test module is collected. It changes nothing for code that does not use Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
