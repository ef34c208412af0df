"""The GenerateService servicer: a GenerateRequest in, the stream of one completion out."""

from __future__ import annotations

from qwenpd.clients.dispatch import FINISH_NAMES, Trace
from qwenpd.errors import InvalidArgument
from qwenpd.gateway.core import Gateway, usage
from qwenpd.protos.qwenpd.v1 import generate_pb2, generate_pb2_grpc, prefill_pb2

_FINISH = {name: value for value, name in FINISH_NAMES.items()}


def prefill_request(request: generate_pb2.GenerateRequest) -> prefill_pb2.PrefillRequest:
    """The PrefillRequest of a GenerateRequest (same prompt, sampling and salt)."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidArgument("prompt", "give the prompt as text, token_ids or chat")
    out = prefill_pb2.PrefillRequest(request_id=request.request_id, sampling=request.sampling)
    if kind == "text":
        out.text = request.text
    else:
        getattr(out, kind).CopyFrom(getattr(request, kind))
    if request.HasField("cache_salt"):
        out.cache_salt = request.cache_salt
    return out


class GenerateServicer(generate_pb2_grpc.GenerateServiceServicer):
    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    async def Generate(self, request: generate_pb2.GenerateRequest, context):
        pre = prefill_request(request)
        trace = Trace()
        first = True
        async for chunk in self.gateway.stream(pre, self.gateway.timeout(context.time_remaining()), trace):
            out = generate_pb2.GenerateChunk(token_ids=chunk.token_ids, text=chunk.text, logprobs=chunk.logprobs)
            if first:
                out.request_id = pre.request_id
                first = False
            if chunk.finish_reason is not None:
                out.finish_reason = _FINISH[chunk.finish_reason]
                out.usage.CopyFrom(usage(trace))
                out.timings.CopyFrom(generate_pb2.GenerateTimings(
                    ttft_ns=int(trace.ttft_s * 1e9), decode_ns=int(trace.decode_s * 1e9),
                    tpot_ns=int(trace.tpot_s * 1e9), resumes=trace.resumes))
            yield out

    async def GetModelInfo(self, request: prefill_pb2.GetModelInfoRequest, context) -> prefill_pb2.ModelInfo:
        info = prefill_pb2.ModelInfo()
        info.CopyFrom(await self.gateway.get_model_info(self.gateway.timeout(context.time_remaining())))
        info.model_name = self.gateway.model_name
        return info
