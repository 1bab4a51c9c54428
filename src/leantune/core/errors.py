"""Errors leantune raises for bad input. Each message names the problem and what to do."""

from __future__ import annotations


class LeantuneError(ValueError):
    """Bad input to leantune: the message says what is wrong and how to fix it."""


class TargetError(LeantuneError):
    """Target modules that match nothing, or match layers a method cannot adapt."""


class AdapterFileError(LeantuneError):
    """An adapter folder or file that is missing, unsafe, corrupt or does not fit the model."""
