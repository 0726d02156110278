"""Benchmarks of the PPO core and the training loop: CPU by default (`pytest benchmarks/`), CUDA with
`pytest benchmarks/ --gpu` or `python -m benchmarks.gpu_suite`. See benchmarks/RESULTS.md."""
