"""The request rules of vLLM's pooling endpoints, as pure functions, and the mapping to `PoolingParams`.

Each check raises `ProtocolError` (400) with vLLM's message where vLLM has one: the API a model
supports, `PoolingParams.verify` (parameters per task, Matryoshka `dimensions`), the input length
check of `_validate_input` and the score pairing rule of `score_utils`.
"""

from __future__ import annotations

from protocol.engine_api import PoolingParams, PoolingTask
from protocol.errors import ProtocolError
from protocol.model import ServedModel

POOLING_TASKS: tuple[PoolingTask, ...] = ("embed", "classify", "score", "token_embed", "token_classify")

# vLLM's `PoolingParams.valid_parameters`: what each task may be asked to change
_VALID_PARAMETERS: dict[str, list[str]] = {
    "embed": ["dimensions", "normalize"],
    "classify": ["use_activation"],
    "score": ["use_activation"],
    "token_embed": ["dimensions", "normalize"],
    "token_classify": ["use_activation"],
}
_ALL_PARAMETERS = ("dimensions", "normalize", "use_activation")


def _bad(message: str, param: str | None = None) -> ProtocolError:
    return ProtocolError(message, status=400, param=param)


# ---- which model serves what ----


def pooling_tasks(model: ServedModel) -> list[PoolingTask]:
    """The pooling tasks a model serves, in vLLM's order."""
    return [task for task in POOLING_TASKS if model.supports(task)]


def require_api(model: ServedModel, api: str, *tasks: PoolingTask) -> None:
    """The model must serve one of `tasks` (any pooling task when none is named)."""
    wanted = tasks or POOLING_TASKS
    if not any(model.supports(task) for task in wanted):
        raise _bad(f"The model does not support {api} API", "model")


def pooling_task(model: ServedModel, requested: str | None) -> PoolingTask:
    """/pooling's `task`: one the model serves. Absent: its per-token task as vLLM picks it
    (token_embed, then token_classify), else its first task other than a cross-encoder's score."""
    served = pooling_tasks(model)
    if requested is None:
        per_token = [task for task in served if task in ("token_embed", "token_classify")]
        return (per_token or [task for task in served if task != "score"] or served)[0]
    for task in served:
        if task == requested:
            return task
    raise _bad(f"Task {requested} is not supported, it should be one of {served}.", "task")


# ---- PoolingParams.verify ----


def pooling_params(
    model: ServedModel,
    task: PoolingTask,
    *,
    dimensions: int | None = None,
    normalize: bool | None = None,
    use_activation: bool | None = None,
) -> PoolingParams:
    """vLLM's `PoolingParams.verify(task)`: only the parameters the task has, and Matryoshka rules."""
    given = {"dimensions": dimensions, "normalize": normalize, "use_activation": use_activation}
    valid = _VALID_PARAMETERS[task]
    invalid = [name for name in _ALL_PARAMETERS if name not in valid and given[name] is not None]
    if invalid:
        raise _bad(
            f"Task {task} only supports {valid} parameters, does not support {invalid} parameters",
            invalid[0],
        )
    if dimensions is not None:
        check_dimensions(model, dimensions)
    return PoolingParams(task=task, normalize=normalize, dimensions=dimensions, use_activation=use_activation)


def check_dimensions(model: ServedModel, dimensions: int) -> None:
    """`dimensions` only on Matryoshka models, and one of their sizes (vLLM's messages)."""
    info = model.pooling
    if info is None or not info.is_matryoshka:
        raise _bad(
            f'Model "{model.name}" does not support matryoshka representation, '
            "changing output dimensions will lead to poor results.",
            "dimensions",
        )
    sizes = info.matryoshka_dimensions
    if sizes is not None:
        if dimensions not in sizes:
            raise _bad(
                f'Model "{model.name}" only supports {list(sizes)} matryoshka dimensions, '
                "use other output dimensions will lead to poor results.",
                "dimensions",
            )
        return
    if dimensions < 1:
        raise _bad("Dimensions must be greater than 0", "dimensions")
    if dimensions > info.hidden_size:
        raise _bad(
            f'Model "{model.name}" has {info.hidden_size} dimensions; it cannot return {dimensions}.',
            "dimensions",
        )


# ---- inputs ----


def check_pooling_length(num_tokens: int, max_model_len: int, operation: str, param: str | None) -> None:
    """vLLM's `_validate_input` for pooling: an input may fill the whole context, not more."""
    if num_tokens > max_model_len:
        raise _bad(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_tokens} tokens in the input for {operation}. Please reduce the length of the input.",
            param,
        )


def check_score_lengths(num_1: int, num_2: int, params: tuple[str, str] = ("text_1", "text_2")) -> None:
    """vLLM's `_validate_score_input_lens`: 1:1, 1:N or N:N, and neither side empty."""
    if num_1 > 1 and num_1 != num_2:
        raise _bad("Input lengths must be either 1:1, 1:N or N:N", params[1])
    if num_1 == 0:
        raise _bad("At least one text element must be given", params[0])
    if num_2 == 0:
        raise _bad("At least one text_pair element must be given", params[1])
