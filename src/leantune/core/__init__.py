"""The bottom layer: errors, files, config checks, memory, several processes, the embedded assets."""
