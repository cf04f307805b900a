"""The lab: the demo, the benchmarks and what they share, outside the library.

Run every script from the repository root as a module::

    python -m benchmarks.demo [--method tbd]
    python -m benchmarks.ablation --method tar --seeds 0 1 2
    python -m benchmarks.distill_gain
    python -m benchmarks.step_cost
    python -m benchmarks.loss_gradients --config-file configs/quickstart/tar_faster_rcnn.yaml

* ``runs``     -- the run cache: train + evaluate a config once, reuse it while
                  nothing that decides its result changed;
* ``setups``   -- the lab's tables and the method discovery: which distilled
                  configs exist, their teachers and plain students, ablation rows,
                  schedules, run folders, command-line helpers.

Importing this package installs the library's filters of detectron2's known
deprecation warnings (:mod:`d2_distill.quiet`), as ``train_net.py`` does.
"""
from d2_distill.quiet import silence_third_party_warnings

silence_third_party_warnings()
