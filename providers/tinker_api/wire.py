"""The Tinker SDK's protobuf messages (its own `tinker_public_pb2`): forward_backward requests in, the
ForwardBackwardOutput and SampleResponse results out. Errors name the field, as the SDK's user wrote it."""

from __future__ import annotations

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from .types import LOSS_INPUTS, Datum

_NUMPY = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


class WireError(ValueError):
    """A malformed or invalid request body: a 400 naming the field."""


def _tensor(t: pb.Tensor, where: str) -> np.ndarray:
    dtype = _NUMPY.get(t.dtype)
    if dtype is None:
        raise WireError(f"{where}: dtype {t.dtype} is not float32 or int64")
    if t.HasField("sparse_csr"):
        raise WireError(f"{where}: sparse tensors are not supported here; send it dense")
    arr = np.frombuffer(t.dense, dtype=dtype)
    if list(t.shape) and int(np.prod(t.shape)) != arr.size:
        raise WireError(f"{where}: shape {list(t.shape)} does not match its {arr.size} values")
    return arr.astype(np.int64 if dtype != np.float32 else np.float32)


def parse_forward_backward(body: bytes) -> pb.ForwardBackwardRequest:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # protobuf's DecodeError: a body that is not this message
        raise WireError(f"body: not a tinker_public.ForwardBackwardRequest ({e})") from None
    return msg


def decode_forward_backward(msg: pb.ForwardBackwardRequest, vocab_size: int, max_tokens: int):
    """The request's (loss_fn, loss config, forward_only, data), checked: a known loss, its inputs present
    and as long as the datum's tokens, token ids inside the vocabulary, at most `max_tokens` in all."""
    loss_fn = msg.loss_fn
    if loss_fn not in LOSS_INPUTS and not msg.forward_only:
        known = ", ".join(LOSS_INPUTS)
        raise WireError(f"loss_fn: {loss_fn!r} is not one of {known} ('custom' losses run in the client: "
                        "forward_backward_custom)")
    needed = LOSS_INPUTS.get(loss_fn, ("target_tokens",))
    config = {k: float(v) for k, v in msg.loss_fn_config.items()}
    config.update({k: v.number for k, v in msg.loss_fn_config_v2.items() if v.WhichOneof("value") == "number"})
    data, total = [], 0
    if not msg.data:
        raise WireError("data: at least one datum")
    for i, d in enumerate(msg.data):
        parts = []
        for j, chunk in enumerate(d.model_input):
            if chunk.WhichOneof("chunk") != "encoded_text":
                raise WireError(f"data[{i}].model_input.chunks[{j}]: only encoded_text chunks (token ids) are "
                                f"supported, not {chunk.WhichOneof('chunk')}")
            parts.append(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32))
        tokens = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        if tokens.size == 0:
            raise WireError(f"data[{i}].model_input: no tokens")
        total += tokens.size
        if total > max_tokens:
            raise WireError(f"data: more than {max_tokens} tokens in one forward_backward; send fewer datums")
        inputs = {name: _tensor(t, f"data[{i}].loss_fn_inputs.{name}") for name, t in d.loss_fn_inputs.items()}
        for name in needed:
            if name not in inputs:
                raise WireError(f"data[{i}].loss_fn_inputs.{name}: required by loss_fn {loss_fn!r}")
        for name, arr in inputs.items():
            if arr.size != tokens.size:
                raise WireError(f"data[{i}].loss_fn_inputs.{name}: {arr.size} values for {tokens.size} input "
                                "tokens (each position needs one)")
        for name, arr in (("model_input", tokens), ("loss_fn_inputs.target_tokens", inputs["target_tokens"])):
            bad = arr[(arr < 0) | (arr >= vocab_size)]
            if bad.size:
                raise WireError(f"data[{i}].{name}: token id {int(bad[0])} is outside the vocabulary "
                                f"(0..{vocab_size - 1})")
        data.append(Datum(tokens, inputs))
    return loss_fn, config, msg.forward_only, data


def _batched(arrays: list[np.ndarray], dtype: int) -> pb.BatchedTensor:
    offsets = np.cumsum([0, *(a.nbytes for a in arrays)]).astype(np.int64)
    return pb.BatchedTensor(data=b"".join(a.tobytes() for a in arrays), offsets=offsets.tobytes(), dtype=dtype)


def encode_forward_backward(outputs: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    record = pb.ArrayRecord(num_datums=len(outputs), fields={
        name: _batched([o[name].astype(np.float32) for o in outputs], pb.DTYPE_FLOAT32) for name in outputs[0]})
    return pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[record],
                                    metrics=metrics).SerializeToString()


MASK_LOGPROB = -99999.0  # the SDK's sentinel of an empty top-k cell (a position with no logprobs)


def _topk(ids: np.ndarray, logprobs: np.ndarray, first_empty: bool = False) -> pb.TopkLogprobs:
    """[n, k] token ids and logprobs as the SDK's TopkLogprobs; `first_empty`: a row of sentinels in front
    (a prompt's first token has no logprobs)."""
    ids, logprobs = ids.astype(np.int32), logprobs.astype(np.float32)
    if first_empty:
        ids = np.concatenate([np.zeros((1, ids.shape[1]), np.int32), ids])
        logprobs = np.concatenate([np.full((1, ids.shape[1]), MASK_LOGPROB, np.float32), logprobs])
    return pb.TopkLogprobs(token_ids=ids.tobytes(), logprobs=logprobs.tobytes(), k=ids.shape[1], length=ids.shape[0])


def encode_sample(result: dict) -> bytes:
    msg = pb.SampleResponse()
    for s in result["sequences"]:
        seq = msg.sequences.add(stop_reason=STOP_REASONS[s["stop_reason"]],
                                tokens=np.asarray(s["tokens"], np.int32).tobytes(),
                                logprobs=np.asarray(s["logprobs"], np.float32).tobytes())
        if "topk_logprobs" in s:
            seq.topk_sampled_logprobs.CopyFrom(_topk(*s["topk_logprobs"]))
    if "prompt_logprobs" in result:
        msg.prompt_logprobs = np.asarray(result["prompt_logprobs"], np.float32).tobytes()
    if "topk_prompt_logprobs" in result:
        msg.topk_prompt_logprobs.CopyFrom(_topk(*result["topk_prompt_logprobs"], first_empty=True))
    return msg.SerializeToString()
