"""The compiled CPU op library builds and loads; the Triton package imports under its own name."""
import importlib


def test_op_library_loads():
    from dapo_mcore import _C

    ops = _C.load()
    assert ops.num_threads() >= 1


def test_triton_kernels_package_name():
    mod = importlib.import_module("dapo_kernels")
    assert mod.__file__.replace("\\", "/").endswith("kernels/__init__.py")


def test_the_kernels_folder_does_not_shadow_pypi_kernels_from_the_checkout():
    """Run from the repository root (``python -c``/``-m`` put it first on sys.path) the folder kernels/ would
    be found as the top-level ``kernels``: Hugging Face's hub-kernels package, which transformers >= 5.25
    imports on model construction. The folder hands the name to that package, or fails as if absent."""
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = ("import sys, kernels, dapo_kernels\n"
            "assert not kernels.__file__.startswith(sys.argv[1]), kernels.__file__\n"
            "assert dapo_kernels.fused_loss_bytes_per_token\n")
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        r = subprocess.run([sys.executable, "-c", code, str(root / "kernels")], cwd=root, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode != 0 and "No module named 'kernels' (the folder kernels/" in r.stderr, r.stderr
        return
    code += ("from transformers import LlamaConfig, LlamaForCausalLM\n"
             "LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
             " num_attention_heads=2, num_key_value_heads=2, vocab_size=64))\n")
    r = subprocess.run([sys.executable, "-c", code, str(root / "kernels")], cwd=root, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
