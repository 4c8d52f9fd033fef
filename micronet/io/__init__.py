"""Reading and writing models: safe micronet checkpoints, plain state_dicts, the 2019 winner's format, and
"any file -> model" for everyone above."""

from micronet.io.checkpoint import (
    Checkpoint,
    load,
    load_into,
    load_state_dict_file,
    read_header,
    read_metadata,
    save,
)
from micronet.io.files import atomic_write, check_output_path
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
    recorded_normalization,
)
from micronet.io.untrusted import check_model_budget, load_json_file, load_yaml_file

__all__ = ["FORMATS", "Checkpoint", "atomic_write", "build_external", "check_model_budget", "check_output_path",
           "checkpoint_normalization", "checkpoint_test_images", "create_model", "detect_format",
           "is_external_spec", "load", "load_into", "load_json_file", "load_model", "load_state_dict_file",
           "load_yaml_file", "parse_model_args", "read_header", "read_metadata", "recorded_normalization", "save"]
