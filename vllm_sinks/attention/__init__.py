"""The SINKS attention backend: its CUDA and CPU paths, kernels and rotary re-encoding."""
