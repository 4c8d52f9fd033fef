"""Reading and writing models: safe micronet checkpoints, plain state_dicts, the 2019 winner's format."""

from micronet.io.checkpoint import (
    Checkpoint,
    atomic_write,
    load,
    load_into,
    load_state_dict_file,
    read_header,
    read_metadata,
    save,
)

__all__ = ["Checkpoint", "atomic_write", "load", "load_into", "load_state_dict_file", "read_header",
           "read_metadata", "save"]
