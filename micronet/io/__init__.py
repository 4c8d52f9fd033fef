"""Reading and writing models: safe micronet checkpoints, plain state_dicts, the 2019 winner's format, and
"any file -> model" for everyone above."""

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
from micronet.io.loading import (
    FORMATS,
    build_external,
    checkpoint_normalization,
    checkpoint_test_images,
    create_model,
    detect_format,
    is_external_spec,
    load_model,
    parse_model_args,
)

__all__ = ["FORMATS", "Checkpoint", "build_external", "is_external_spec", "parse_model_args",
           "atomic_write", "checkpoint_normalization", "checkpoint_test_images",
           "create_model", "detect_format", "load", "load_into", "load_model", "load_state_dict_file",
           "read_header", "read_metadata", "save"]
