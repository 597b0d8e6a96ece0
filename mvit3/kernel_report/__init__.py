"""The kernels report (`python -m mvit3 kernels`): for every launch of one forward, what the
compiler made of the kernel (registers, spills, shared memory, occupancy, tensor-core class,
load width), its grid against the GPU's SMs, and its least bytes and FLOPs against the roofline.
Runs without a GPU: kernels are compiled ahead of time for the chosen arch."""
