"""The adapter protocol and registry, targets, inject, files, accounting, combine, hotswap; methods/ holds the methods."""
