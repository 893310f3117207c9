"""Triton's ``ModelConfig`` as a table, and strict validation of ``config.pbtxt`` against it.

Every ``config.pbtxt`` is validated before it is written (:func:`validate_model_config`) against a
table of Triton's ``ModelConfig`` message fields written here (:data:`MODEL_CONFIG_SCHEMA`): the
text is parsed strictly by protobuf's text-format parser on message descriptors built from that
table, so an unknown field, a wrong enum value or a value of the wrong type is an error. The
table models the part of ``model_config.proto`` that qcloop writes and its close neighbours; a
field outside it is reported as unknown.
"""

from __future__ import annotations

import functools
from typing import Any

from qcloop.deploy.triton.errors import TritonError

__all__ = [
    "ENUMS",
    "MODEL_CONFIG_SCHEMA",
    "ONEOFS",
    "model_config_class",
    "parse_model_config",
    "validate_model_config",
]

# Triton's ModelConfig (model_config.proto, package "inference"), transcribed as a table: for
# each message, field name -> (label, type). label: "optional", "repeated" or "map"; type: a
# scalar type name, an enum name from ENUMS, a message name from this table, or for maps a
# (key type, value type) pair. Oneof groups are listed in ONEOFS.

ENUMS: dict[str, tuple[str, ...]] = {
    "DataType": (
        "TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64",
        "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32",
        "TYPE_FP64", "TYPE_STRING", "TYPE_BF16",
    ),
    "InstanceGroupKind": ("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"),
    "InputFormat": ("FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"),
    "TimeoutAction": ("REJECT", "DELAY"),
}  # fmt: skip

MODEL_CONFIG_SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "ModelConfig": {
        "name": ("optional", "string"),
        "platform": ("optional", "string"),
        "backend": ("optional", "string"),
        "runtime": ("optional", "string"),
        "version_policy": ("optional", "ModelVersionPolicy"),
        "max_batch_size": ("optional", "int32"),
        "input": ("repeated", "ModelInput"),
        "output": ("repeated", "ModelOutput"),
        "dynamic_batching": ("optional", "ModelDynamicBatching"),
        "ensemble_scheduling": ("optional", "ModelEnsembling"),
        "instance_group": ("repeated", "ModelInstanceGroup"),
        "default_model_filename": ("optional", "string"),
        "cc_model_filenames": ("map", ("string", "string")),
        "metric_tags": ("map", ("string", "string")),
        "parameters": ("map", ("string", "ModelParameter")),
        "model_transaction_policy": ("optional", "ModelTransactionPolicy"),
        "response_cache": ("optional", "ModelResponseCache"),
    },
    "ModelVersionPolicy": {
        "latest": ("optional", "VersionLatest"),
        "all": ("optional", "VersionAll"),
        "specific": ("optional", "VersionSpecific"),
    },
    "VersionLatest": {"num_versions": ("optional", "uint32")},
    "VersionAll": {},
    "VersionSpecific": {"versions": ("repeated", "int64")},
    "ModelTensorReshape": {"shape": ("repeated", "int64")},
    "ModelInput": {
        "name": ("optional", "string"),
        "data_type": ("optional", "DataType"),
        "format": ("optional", "InputFormat"),
        "dims": ("repeated", "int64"),
        "reshape": ("optional", "ModelTensorReshape"),
        "is_shape_tensor": ("optional", "bool"),
        "allow_ragged_batch": ("optional", "bool"),
        "optional": ("optional", "bool"),
    },
    "ModelOutput": {
        "name": ("optional", "string"),
        "data_type": ("optional", "DataType"),
        "dims": ("repeated", "int64"),
        "reshape": ("optional", "ModelTensorReshape"),
        "label_filename": ("optional", "string"),
        "is_shape_tensor": ("optional", "bool"),
    },
    "ModelInstanceGroup": {
        "name": ("optional", "string"),
        "kind": ("optional", "InstanceGroupKind"),
        "count": ("optional", "int32"),
        "gpus": ("repeated", "int32"),
        "profile": ("repeated", "string"),
        "passive": ("optional", "bool"),
        "host_policy": ("optional", "string"),
    },
    "ModelQueuePolicy": {
        "timeout_action": ("optional", "TimeoutAction"),
        "default_timeout_microseconds": ("optional", "uint64"),
        "allow_timeout_override": ("optional", "bool"),
        "max_queue_size": ("optional", "uint32"),
    },
    "ModelDynamicBatching": {
        "preferred_batch_size": ("repeated", "int32"),
        "max_queue_delay_microseconds": ("optional", "uint64"),
        "preserve_ordering": ("optional", "bool"),
        "priority_levels": ("optional", "uint64"),
        "default_priority_level": ("optional", "uint64"),
        "default_queue_policy": ("optional", "ModelQueuePolicy"),
    },
    "EnsembleStep": {
        "model_name": ("optional", "string"),
        "model_version": ("optional", "int64"),
        "input_map": ("map", ("string", "string")),
        "output_map": ("map", ("string", "string")),
    },
    "ModelEnsembling": {"step": ("repeated", "EnsembleStep")},
    "ModelParameter": {"string_value": ("optional", "string")},
    "ModelTransactionPolicy": {"decoupled": ("optional", "bool")},
    "ModelResponseCache": {"enable": ("optional", "bool")},
}

#: Oneof groups: message -> group name -> member fields (at most one may be set).
ONEOFS: dict[str, dict[str, tuple[str, ...]]] = {
    # Triton also has sequence_batching in this group; it is outside the table.
    "ModelConfig": {"scheduling_choice": ("dynamic_batching", "ensemble_scheduling")},
    "ModelVersionPolicy": {"policy_choice": ("latest", "all", "specific")},
}

_PACKAGE = "qcloop_triton_schema"


_SCALARS = ("string", "bool", "int32", "int64", "uint32", "uint64", "float", "double")


def _set_type(field: Any, type_name: str) -> None:
    """Give a field descriptor the scalar, enum or message type ``type_name`` of the table."""
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FieldDescriptorProto
    if type_name in _SCALARS:
        field.type = getattr(proto, f"TYPE_{type_name.upper()}")
    elif type_name in ENUMS or type_name in MODEL_CONFIG_SCHEMA:
        field.type = proto.TYPE_ENUM if type_name in ENUMS else proto.TYPE_MESSAGE
        field.type_name = f".{_PACKAGE}.{type_name}"
    else:  # pragma: no cover - a mistake in the table
        raise TritonError(f"schema table: unknown type {type_name!r}")


def _add_map_field(msg: Any, field: Any, message_name: str, types: tuple[str, str]) -> None:
    """Make ``field`` a protobuf map (a repeated nested ``...Entry`` message) of ``types``."""
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FieldDescriptorProto
    entry_name = "".join(p.capitalize() for p in field.name.split("_")) + "Entry"
    entry = msg.nested_type.add(name=entry_name)
    entry.options.map_entry = True
    for number, (name, type_name) in enumerate(zip(("key", "value"), types, strict=True), 1):
        _set_type(entry.field.add(name=name, number=number, label=proto.LABEL_OPTIONAL), type_name)
    field.label = proto.LABEL_REPEATED
    field.type = proto.TYPE_MESSAGE
    field.type_name = f".{_PACKAGE}.{message_name}.{entry_name}"


def _add_message(fdp: Any, message_name: str, fields: dict[str, tuple[str, Any]]) -> None:
    """Add one message of the table, with its oneof groups, to the file descriptor ``fdp``."""
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FieldDescriptorProto
    msg = fdp.message_type.add(name=message_name)
    group_index = {}
    for index, (group, members) in enumerate(ONEOFS.get(message_name, {}).items()):
        msg.oneof_decl.add(name=group)
        group_index.update(dict.fromkeys(members, index))
    for number, (field_name, (label, type_spec)) in enumerate(fields.items(), start=1):
        field = msg.field.add(name=field_name, number=number)
        if label == "map":
            _add_map_field(msg, field, message_name, type_spec)
            continue
        field.label = proto.LABEL_REPEATED if label == "repeated" else proto.LABEL_OPTIONAL
        _set_type(field, type_spec)
        if field_name in group_index:
            field.oneof_index = group_index[field_name]


@functools.lru_cache(maxsize=1)
def model_config_class() -> Any:
    """A protobuf message class for ``ModelConfig``, built from :data:`MODEL_CONFIG_SCHEMA`."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(
        name="qcloop_triton_model_config.proto", package=_PACKAGE, syntax="proto3"
    )
    for enum_name, values in ENUMS.items():
        enum = fdp.enum_type.add(name=enum_name)
        for number, value in enumerate(values):
            enum.value.add(name=value, number=number)
    for message_name, fields in MODEL_CONFIG_SCHEMA.items():
        _add_message(fdp, message_name, fields)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.ModelConfig"))


def parse_model_config(text: str, source: str = "config.pbtxt") -> Any:
    """Parse ``config.pbtxt`` text strictly against the table; TritonError names the problem."""
    from google.protobuf import text_format

    message = model_config_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise TritonError(f"{source}: not a valid Triton model configuration: {exc}") from exc
    return message


_PLATFORMS = {"onnxruntime_onnx", "ensemble", "tensorrt_plan", "pytorch_libtorch"}


def validate_model_config(text: str, source: str = "config.pbtxt") -> Any:
    """Parse and check one configuration: field names, enum values and types (the parser), then
    what Triton requires of them (a name, a known platform or a backend, tensors with a name, a
    data type and valid dims, an ensemble with steps and no instance groups)."""
    config = parse_model_config(text, source)
    problems = []
    if not config.name:
        problems.append("name: missing")
    if not config.platform and not config.backend:
        problems.append("platform/backend: one of them is required")
    if config.platform and config.platform not in _PLATFORMS:
        problems.append(f"platform: unknown platform {config.platform!r}")
    if config.max_batch_size < 0:
        problems.append(f"max_batch_size: must be >= 0, got {config.max_batch_size}")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        if not tensors:
            problems.append(f"{kind}: at least one is required")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            problems.append(f"{kind}: duplicate names {names}")
        for t in tensors:
            if not t.name:
                problems.append(f"{kind}: a tensor has no name")
            if t.data_type == 0:
                problems.append(f"{kind} {t.name}: data_type missing (TYPE_INVALID)")
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                problems.append(f"{kind} {t.name}: dims must be non-empty, each -1 or > 0")
    batching = config.dynamic_batching
    if config.HasField("dynamic_batching"):
        if config.max_batch_size == 0:
            problems.append("dynamic_batching: needs max_batch_size > 0")
        for size in batching.preferred_batch_size:
            if not 0 < size <= config.max_batch_size:
                problems.append(
                    f"dynamic_batching.preferred_batch_size: {size} is not in "
                    f"1..max_batch_size ({config.max_batch_size})"
                )
    if config.platform == "ensemble":
        if not config.ensemble_scheduling.step:
            problems.append("ensemble_scheduling: an ensemble needs at least one step")
        if config.instance_group:
            problems.append("instance_group: not allowed on an ensemble")
        for i, step in enumerate(config.ensemble_scheduling.step):
            if not step.model_name:
                problems.append(f"ensemble_scheduling.step[{i}]: model_name missing")
            if not step.input_map or not step.output_map:
                problems.append(f"ensemble_scheduling.step[{i}]: input_map and output_map needed")
    elif config.HasField("ensemble_scheduling"):
        problems.append("ensemble_scheduling: only for platform 'ensemble'")
    for i, group in enumerate(config.instance_group):
        if group.count < 0:
            problems.append(f"instance_group[{i}].count: must be >= 0")
        if group.kind in (2, 3) and group.gpus:  # KIND_CPU, KIND_MODEL
            problems.append(f"instance_group[{i}].gpus: not allowed with KIND_CPU/KIND_MODEL")
    if problems:
        raise TritonError(f"{source}: " + "; ".join(problems))
    return config
