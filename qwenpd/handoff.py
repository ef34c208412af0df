"""The prefill -> decode contract in domain form: sampling options to and from protobuf, and the `Handoff`
record prefill stores in the checkpoint's metadata (key "qwenpd.handoff", protobuf JSON) for decode to resume
from. Both services convert here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from google.protobuf import json_format

from qwenpd.engine.sampling import SamplingParams
from qwenpd.errors import DataLoss, InvalidArgument
from qwenpd.protos.qwenpd.v1 import common_pb2

HANDOFF_KEY = "qwenpd.handoff"
PROMPT_TAIL = 8  # prompt ids kept for decode's incremental detokenizer
MAX_DRAWS = 1 << 20  # more sampler draws than any context holds tokens: a record claiming more is corrupt
_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def sampling_from_pb(pb: common_pb2.SamplingParams, default_max_tokens: int, vocab_size: int,
                     field_prefix: str = "sampling") -> SamplingParams:
    """Validated engine SamplingParams from a request's message; InvalidArgument names the bad field.

    Absent optional fields take their defaults (temperature 1, top_p 1, max_tokens `default_max_tokens`);
    an absent seed stays None (prefill draws one with `with_seed`).
    """
    try:
        params = SamplingParams(
            temperature=pb.temperature if pb.HasField("temperature") else 1.0,
            top_p=pb.top_p if pb.HasField("top_p") else 1.0,
            top_k=pb.top_k,
            seed=pb.seed if pb.HasField("seed") else None,
            max_tokens=pb.max_tokens if pb.HasField("max_tokens") else default_max_tokens,
            stop=tuple(pb.stop),
            stop_token_ids=tuple(pb.stop_token_ids),
            ignore_eos=pb.ignore_eos,
            min_p=pb.min_p,
            logit_bias=tuple(sorted(pb.logit_bias.items())),
            min_tokens=pb.min_tokens,
            presence_penalty=pb.presence_penalty,
            frequency_penalty=pb.frequency_penalty,
            top_logprobs=pb.top_logprobs,
            structured_output=pb.structured_output,
            repetition_penalty=pb.repetition_penalty if pb.HasField("repetition_penalty") else 1.0,
            token_bytes=pb.token_bytes,
            speculative=pb.speculative if pb.HasField("speculative") else None,
        )
    except ValueError as exc:  # SamplingParams' messages start with the field's name
        name = str(exc).split(" ", 1)[0]
        raise InvalidArgument(f"{field_prefix}.{name}" if name in _FIELDS else field_prefix, str(exc)) from None
    for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", [t for t, _ in params.logit_bias])):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise InvalidArgument(f"{field_prefix}.{name}",
                                  f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return params


def with_seed(params: SamplingParams) -> SamplingParams:
    """The same options with a seed drawn now if there was none, so decode can continue the stream."""
    return params if params.seed is not None else dataclasses.replace(params, seed=secrets.randbits(63))


def sampling_to_pb(params: SamplingParams) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                   max_tokens=params.max_tokens, stop=list(params.stop),
                                   stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
                                   min_p=params.min_p, logit_bias=dict(params.logit_bias),
                                   min_tokens=params.min_tokens, presence_penalty=params.presence_penalty,
                                   frequency_penalty=params.frequency_penalty, top_logprobs=params.top_logprobs,
                                   structured_output=params.structured_output, token_bytes=params.token_bytes)
    if params.repetition_penalty != 1.0:
        pb.repetition_penalty = params.repetition_penalty
    if params.seed is not None:
        pb.seed = params.seed
    if params.speculative is not None:
        pb.speculative = params.speculative
    return pb


@dataclass(slots=True, frozen=True)
class Handoff:
    """What decode needs besides the state: the first token (already sampled), the resolved sampling options
    (seed always set), how far the random stream has advanced, counts, and the prompt's last ids."""

    request_id: str
    first_token: int
    first_logprob: float
    first_text: str
    sampling: SamplingParams
    sampler_draws: int
    prompt_tokens: int
    cached_tokens: int
    prompt_tail_ids: tuple[int, ...]
    pending_text: str = ""  # resumed requests: stop-string text held back from the tokens already generated
    detok_unread: int = 0  # resumed requests: generated ids at the end of the tail not yet detokenized
    generated_ids: tuple[int, ...] = ()  # resumed requests with penalties: the tokens generated so far
    first_top: tuple[tuple[int, float, str], ...] = ()  # top_logprobs: the first token's candidates (id, lp, text)
    first_token_delivered: bool = False  # resumed: first_token was streamed before the failure
    replay_ids: tuple[int, ...] = ()  # resumed: tokens already streamed, fed after first_token before sampling
    prompt_seen: tuple[int, ...] = ()  # repetition_penalty: the prompt's distinct ids, ascending
    image_tokens: int = 0  # prompt tokens that stand for images and video frames (usage)

    def to_pb(self) -> common_pb2.Handoff:
        return common_pb2.Handoff(
            request_id=self.request_id,
            first_token=common_pb2.Token(id=self.first_token, text=self.first_text, logprob=self.first_logprob,
                                         top_logprobs=[common_pb2.TopLogprob(id=i, logprob=lp, text=t)
                                                       for i, lp, t in self.first_top]),
            sampling=sampling_to_pb(self.sampling), sampler_draws=self.sampler_draws,
            prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
            prompt_tail_ids=list(self.prompt_tail_ids[-(PROMPT_TAIL + self.detok_unread):]),
            pending_text=self.pending_text, detok_unread=self.detok_unread,
            generated_ids=list(self.generated_ids), first_token_delivered=self.first_token_delivered,
            replay_ids=list(self.replay_ids), prompt_seen_ids=list(self.prompt_seen),
            image_tokens=self.image_tokens)

    @classmethod
    def from_pb(cls, pb: common_pb2.Handoff, vocab_size: int) -> "Handoff":
        try:
            sampling = sampling_from_pb(pb.sampling, pb.sampling.max_tokens, vocab_size, "handoff.sampling")
        except InvalidArgument as exc:
            raise DataLoss(f"checkpoint hand-off record is invalid: {exc.message}",
                           reason="HANDOFF_CORRUPT") from None
        if sampling.seed is None or pb.first_token.id >= vocab_size:
            raise DataLoss("checkpoint hand-off record lacks a seed or has a bad first token",
                           reason="HANDOFF_CORRUPT")
        if not 1 <= pb.sampler_draws <= MAX_DRAWS:  # decode replays this many draws: bound it
            raise DataLoss(f"checkpoint hand-off record has {pb.sampler_draws} sampler draws",
                           reason="HANDOFF_CORRUPT")
        if pb.detok_unread > len(pb.prompt_tail_ids):
            raise DataLoss("checkpoint hand-off record has more unread ids than tail ids", reason="HANDOFF_CORRUPT")
        most = pb.sampler_draws if pb.first_token_delivered else pb.sampler_draws - 1  # draws made before decode
        if len(pb.generated_ids) > most or any(t >= vocab_size for t in (*pb.generated_ids, *pb.replay_ids)):
            raise DataLoss("checkpoint hand-off record has more generated ids than draws, or bad ones",
                           reason="HANDOFF_CORRUPT")
        if any(t >= vocab_size for t in pb.prompt_seen_ids):
            raise DataLoss("checkpoint hand-off record has prompt ids outside the vocabulary",
                           reason="HANDOFF_CORRUPT")
        if pb.replay_ids and (not pb.first_token_delivered or len(pb.replay_ids) >= pb.sampler_draws):
            raise DataLoss("checkpoint hand-off record replays more tokens than were drawn",
                           reason="HANDOFF_CORRUPT")
        return cls(request_id=pb.request_id, first_token=pb.first_token.id, first_logprob=pb.first_token.logprob,
                   first_text=pb.first_token.text, sampling=sampling, sampler_draws=pb.sampler_draws,
                   prompt_tokens=pb.prompt_tokens, cached_tokens=pb.cached_tokens,
                   prompt_tail_ids=tuple(pb.prompt_tail_ids), pending_text=pb.pending_text,
                   detok_unread=pb.detok_unread, generated_ids=tuple(pb.generated_ids),
                   first_top=tuple((c.id, c.logprob, c.text) for c in pb.first_token.top_logprobs),
                   first_token_delivered=pb.first_token_delivered, replay_ids=tuple(pb.replay_ids),
                   prompt_seen=tuple(pb.prompt_seen_ids), image_tokens=min(pb.image_tokens, pb.prompt_tokens))

    def to_metadata(self) -> dict[str, str]:
        return {HANDOFF_KEY: json_format.MessageToJson(self.to_pb(), indent=None)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], vocab_size: int) -> "Handoff":
        raw = metadata.get(HANDOFF_KEY)
        if raw is None:
            raise DataLoss(f"checkpoint has no {HANDOFF_KEY!r} metadata: not written by a prefill service",
                           reason="HANDOFF_MISSING")
        try:
            pb = json_format.Parse(raw, common_pb2.Handoff())
        except json_format.ParseError as exc:
            raise DataLoss(f"checkpoint hand-off record is not valid: {exc}", reason="HANDOFF_CORRUPT") from None
        return cls.from_pb(pb, vocab_size)


STREAM_KEY = "qwenpd.stream"
STREAM_TAIL = 16  # last consumed ids a stream record keeps


def prompt_digest(token_ids: Sequence[int], media_keys: Sequence[bytes] = ()) -> str:
    """The prompt's identity: its token ids and, for a prompt with images, their content keys (the same pad
    tokens stand for any picture of the same size)."""
    return hashlib.sha256(np.asarray(token_ids, dtype="<u4").tobytes() + b"".join(media_keys)).hexdigest()


@dataclass(slots=True, frozen=True)
class StreamRecord:
    """Whose state a resume checkpoint holds and how far it got: stored with the hand-off checkpoint (prefill)
    and with every decode-side checkpoint (decode), key "qwenpd.stream". A resume restores the state only if the
    record matches the request: same original prompt and seed (which with the sampling options fix the whole
    stream), a position inside the tokens the client has, and the same ids just before it."""

    prompt_digest: str  # prompt_digest() of the original prompt
    prompt_tokens: int
    num_tokens: int  # tokens the state has consumed
    seed: int
    tail: tuple[int, ...]  # the last STREAM_TAIL ids consumed

    def to_metadata(self) -> dict[str, str]:
        return {STREAM_KEY: json.dumps({"prompt_digest": self.prompt_digest, "prompt_tokens": self.prompt_tokens,
                                        "num_tokens": self.num_tokens, "seed": self.seed, "tail": list(self.tail)})}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> "StreamRecord | None":
        """The record, or None if there is none or it does not parse (the checkpoint is then not used)."""
        try:
            d = json.loads(metadata[STREAM_KEY])
            return cls(str(d["prompt_digest"]), int(d["prompt_tokens"]), int(d["num_tokens"]), int(d["seed"]),
                       tuple(int(t) for t in d["tail"]))
        except (KeyError, TypeError, ValueError):
            return None

    def advanced(self, num_tokens: int, tail: Sequence[int]) -> "StreamRecord":
        return dataclasses.replace(self, num_tokens=num_tokens, tail=tuple(tail)[-STREAM_TAIL:])

    def mismatch(self, ids: Sequence[int], prompt_tokens: int, seed: int | None, media_keys: Sequence[bytes] = ()
                 ) -> str:
        """Why this state does not continue `ids` (original prompt + tokens generated) with `prompt_tokens`
        prompt tokens; "" when it does: a position from the prompt's end up to the last id (exclusive), same
        prompt, seed and tail."""
        c = self.num_tokens
        if self.prompt_tokens != prompt_tokens:
            return f"its prompt has {self.prompt_tokens} tokens, this one {prompt_tokens}"
        if not prompt_tokens <= c < len(ids):
            return f"its position {c} is not in [{prompt_tokens}, {len(ids)})"
        if self.seed != seed:
            return "another seed"
        if tuple(ids[max(0, c - STREAM_TAIL):c]) != self.tail:
            return "other tokens before its position"
        if self.prompt_digest != prompt_digest(ids[:prompt_tokens], media_keys):
            return "another prompt (or other images)"
        return ""
