"""The compiled CPU op library builds and loads; the Triton package imports under its own name."""
import importlib


def test_op_library_loads():
    from dapo_mcore import _C

    ops = _C.load()
    assert ops.num_threads() >= 1


def test_triton_kernels_package_name():
    mod = importlib.import_module("dapo_kernels")
    assert mod.__file__.replace("\\", "/").endswith("kernels/__init__.py")
