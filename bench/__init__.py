"""mvit3 benchmarks (shipped as `mvit3.bench`).

- `python -m mvit3 bench` (`cli`): the paper's Table 5 reproduced on the device at hand. The
  rows are run by `runner`, timed by `timing`, their launches counted by `launches`, rendered
  by `report` and `plot`, with the paper's figures (`paper`) and the environment (`env`).
- `pytest bench/ --benchmark-only` (`test_ops_bench`, cases in `cases`): kernel
  micro-benchmarks.
- `python -m mvit3 gpu-report` (`gpu_report`): every GPU check and benchmark into one folder.

Modules are imported on use; importing this package imports nothing heavy.
"""
