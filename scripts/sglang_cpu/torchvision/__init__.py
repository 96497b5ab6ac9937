"""dapo-mcore's import-only stand-in for ``torchvision`` (test tier only; installed by
``scripts/setup.sh --sglang`` into the SGLang venv's site-packages).

SGLang 0.5.23 imports torchvision at server start (its multimodal processors are registered
eagerly), but no torchvision wheel matches the CPU ``torch==2.13.0``, and text models never call
it. Every attribute, and every submodule (``torchvision.transforms.functional``, ...), is an inert
object: it can be imported, subclassed, called and indexed, and does nothing. There is no
``dist-info``, so ``importlib.metadata`` (and transformers' availability checks) still report
torchvision as not installed.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+dapo.standin"
STANDIN = True


class _InertMeta(type):
    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(f"{cls.__name__}.{name}")

    def __getitem__(cls, item):
        return cls

    def __iter__(cls):
        return iter(())

    def __bool__(cls):
        return False


class _Inert(metaclass=_InertMeta):
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return self

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(name)


def _inert(name: str) -> type:
    return _InertMeta(name.rsplit(".", 1)[-1], (_Inert,), {"__qualname__": name})


class _InertModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _inert(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes every ``torchvision.<sub>`` import an inert package."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _InertModule(spec.name)
        mod.__path__ = []
        return mod

    def exec_module(self, module):
        pass


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _inert(f"{__name__}.{name}")


sys.meta_path.append(_Finder())
