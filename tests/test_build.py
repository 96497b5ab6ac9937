"""The compiled CPU op library builds and loads; the Triton package imports under its own name."""
import importlib


def test_op_library_loads():
    from dapo_mcore import _C

    ops = _C.load()
    assert ops.num_threads() >= 1


def test_triton_kernels_package_name():
    mod = importlib.import_module("dapo_kernels")
    assert mod.__file__.replace("\\", "/").endswith("kernels/__init__.py")


_BUILD_LLAMA = ("from transformers import LlamaConfig, LlamaForCausalLM\n"
                "LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
                " num_attention_heads=2, num_key_value_heads=2, vocab_size=64))\n")


def _from_the_checkout(code, *, site=None):
    """Run ``code`` as ``python -c`` with the repository root as the working directory (first on sys.path);
    with ``site``, that folder is the only site-packages (python -S, then site.addsitedir)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    flags = []
    if site is not None:
        flags, code = ["-S"], f"import site; site.addsitedir({str(site)!r})\n" + code
    return subprocess.run([sys.executable, *flags, "-c", code, str(root / "kernels")], cwd=root,
                          capture_output=True, text=True, timeout=300)


def test_the_kernels_folder_hands_its_name_to_pypi_kernels():
    """Run from the repository root (``python -c``/``-m`` put it first on sys.path) the folder kernels/ would
    be found as the top-level ``kernels``: Hugging Face's hub-kernels package, which transformers >= 5.25
    imports on model construction. Where that package is installed, the folder loads it in its place."""
    import importlib.metadata

    import pytest

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("PyPI's kernels is not installed here (the case without it is the next test)")
    r = _from_the_checkout("import sys, kernels, dapo_kernels\n"
                           "assert not kernels.__file__.startswith(sys.argv[1]), kernels.__file__\n"
                           "assert dapo_kernels.fused_loss_bytes_per_token\n" + _BUILD_LLAMA)
    assert r.returncode == 0, r.stderr[-3000:]


def test_the_kernels_folder_reads_as_absent_without_pypi_kernels(tmp_path):
    """Without PyPI's kernels (transformers < 5.25 does not need it), ``kernels`` from the checkout is an
    empty namespace package: transformers' availability check says it is not installed and transformers
    imports and builds a model (an exception there broke ``import transformers`` from the checkout), and
    nothing of dapo_kernels is reachable under that name. The environment without it is this interpreter's
    site-packages less PyPI's kernels and its metadata (a folder of links)."""
    import os
    import sysconfig

    site = tmp_path / "site"
    site.mkdir()
    purelib = sysconfig.get_paths()["purelib"]
    for name in os.listdir(purelib):
        if name != "kernels" and not name.startswith("kernels-"):
            os.symlink(os.path.join(purelib, name), site / name)
    r = _from_the_checkout(
        "import importlib.metadata, sys\n"
        "try:\n    importlib.metadata.distribution('kernels')\nexcept importlib.metadata.PackageNotFoundError:\n"
        "    pass\nelse:\n    raise SystemExit('kernels metadata still visible')\n"
        "from transformers.utils import is_kernels_available\n"
        "assert not is_kernels_available()\n"
        "import kernels, dapo_kernels\n"
        "assert getattr(kernels, '__file__', None) is None and list(kernels.__path__) == [], kernels\n"
        "assert not hasattr(kernels, 'fused_loss_bytes_per_token')\n"
        "assert dapo_kernels.fused_loss_bytes_per_token\n"
        "try:\n    from kernels import get_kernel\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('kernels.get_kernel imported')\n" + _BUILD_LLAMA, site=site)
    assert r.returncode == 0, r.stderr[-3000:]
