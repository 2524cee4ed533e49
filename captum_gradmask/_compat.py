"""The one place that imports Captum's private helpers.

Captum does not promise these names across releases; keeping them here means a
Captum upgrade touches one file.
"""

from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
    _run_forward,
    _select_targets,
)

__all__ = [
    "_format_additional_forward_args",
    "_format_output",
    "_format_tensor_into_tuples",
    "_is_tuple",
    "_run_forward",
    "_select_targets",
]
