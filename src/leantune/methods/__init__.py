"""PEFT methods, one file each."""
