"""The decode service's stepping loop when a step fails and freeing the slots fails too (a lost tensor-parallel
rank breaks every engine call): every sequence in the batch gets the step's error at once (its stream ends with
it, not at the drain's deadline), and the loop lives on, failing later sequences at once with UNAVAILABLE."""

from __future__ import annotations

import resource
import time

from qwenpd.decode_service.runner import DecodeRunner
from qwenpd.engine.engine import DecodeBatch
from qwenpd.engine.sampling import SamplingParams
from qwenpd.errors import QwenpdError, Unavailable
from tests.decode_service.test_speculative_runner import Delivered, _sequence

PARAMS = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def test_a_failed_step_and_slot_release_fail_the_batch_and_later_sequences_at_once(engine, monkeypatch):
    got = Delivered()
    outputs = got.outputs

    broken = {"on": True}
    step, remove = DecodeBatch.step, DecodeBatch.remove

    def failing(name, plain):
        def call(self, *args, **kw):
            if broken["on"]:
                raise QwenpdError(f"{name}: tensor-parallel rank 1 exited with code -9")
            return plain(self, *args, **kw)
        return call

    monkeypatch.setattr(DecodeBatch, "step", failing("step", step))
    monkeypatch.setattr(DecodeBatch, "remove", failing("remove", remove))
    runner = DecodeRunner(lambda: engine, 4, 8, got.deliver)
    runner.start()
    try:
        seqs = [_sequence(engine, None, [5 + i, 9, 11, 13], PARAMS, f"r{i}", drafts=False)[0] for i in range(2)]
        for seq in seqs:
            runner.submit(seq)
        got.wait([s.request_id for s in seqs], timeout=60)
        for seq in seqs:
            (err,) = [o.error for o in outputs[seq.request_id] if o.error is not None]
            assert "step: tensor-parallel rank 1" in str(err)
        assert runner.load_info().active == 0
        # the batch could not free its slots: a later sequence fails at once, UNAVAILABLE (it resumes elsewhere)
        seq = _sequence(engine, None, [7, 9, 11], PARAMS, "after", drafts=False)[0]
        runner.submit(seq)
        got.wait(["after"], timeout=60)
        (out,) = outputs["after"]
        assert isinstance(out.error, Unavailable) and "freeing a slot failed" in str(out.error)
        assert runner.load_info().active == 0
        used = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(1.0)  # the loop waits for work (it does not spin on the broken batch's leftover slots)
        now = resource.getrusage(resource.RUSAGE_SELF)
        assert now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime < 0.5
    finally:
        runner.stop()
