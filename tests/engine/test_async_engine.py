"""AsyncEngine: the engine loop on its own thread, streamed to asyncio callers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from adapters import AdapterNotFoundError
from server.engine.adapter_ref import AdapterRef
from server.engine.async_engine import AsyncEngine
from server.engine.errors import EngineDeadError, EngineFailedError, EngineStoppedError, RequestError
from support.engine import PROMPTS, assert_released, break_loop_when_busy, greedy, make_engine

JOIN_TIMEOUT = 60  # seconds; only so a hung loop fails the test instead of the whole run


async def until(engine: AsyncEngine, condition, max_checks: int = 6000) -> None:
    """Until `condition()` holds, checked on the engine thread: a command runs only between steps, so
    each check waits for the step in progress instead of a clock. Bounded in count and time."""
    for _ in range(max_checks):
        if await asyncio.wait_for(engine.call(condition), JOIN_TIMEOUT):
            return
    raise AssertionError("condition never held")


async def collect(engine: AsyncEngine, prompt, params, adapter=None) -> list:
    return [output async for output in engine.stream(prompt, params, AdapterRef.of(adapter))]


def test_concurrent_streams_equal_generate(adapter_paths):
    requests = [(PROMPTS[0], None, 8), (PROMPTS[1], "a", 10), (PROMPTS[2], "b", 6), (PROMPTS[3], "a", 12)]
    expected = make_engine(adapter_paths).generate(
        [p for p, _, _ in requests], [greedy(n) for _, _, n in requests], [a for _, a, _ in requests]
    )
    llm = make_engine(adapter_paths)
    engine = AsyncEngine(llm)
    try:

        async def main():
            streams = await asyncio.gather(*(collect(engine, p, greedy(n), a) for p, a, n in requests))
            await until(engine, lambda: engine.is_idle)
            return streams

        streams = asyncio.run(main())
        for outputs, completion, (_, _, n) in zip(streams, expected, requests):
            assert "".join(o.text for o in outputs) == completion.text
            assert [t for o in outputs for t in o.token_ids] == completion.token_ids
            assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
            assert outputs[-1].finish_reason == "length" and outputs[-1].num_output_tokens == n
        assert len({o[0].request_id for o in streams}) == len(requests)
    finally:
        engine.stop(JOIN_TIMEOUT)
    assert_released(llm)


def test_a_final_only_request_gets_its_deltas_together_when_it_finishes():
    """A caller that answers once (a request that is not streamed) is not woken for every token:
    halfway through, nothing has reached it while a streamed twin holds its deltas; then it gets
    the very same deltas, in order."""
    llm = make_engine()
    engine = AsyncEngine(llm)
    try:

        async def main():
            streamed = await engine.submit(PROMPTS[0], greedy(12))
            final = await engine.submit(PROMPTS[0], greedy(12), final_only=True)
            running = llm.requests[final.request_id]
            await until(engine, lambda: len(running.output_token_ids) >= 6)
            await asyncio.sleep(0)  # let the loop run what the engine thread posted
            assert streamed.num_pending >= 5 and final.num_pending == 0
            outputs = [o async for o in streamed], [o async for o in final]
            streamed.close(), final.close()
            return outputs

        streamed, final = asyncio.run(main())
        strip = lambda outputs: [(o.text, o.token_ids, o.finished, o.finish_reason) for o in outputs]  # noqa: E731
        assert len(final) == 12 and strip(final) == strip(streamed)
        assert engine.num_streams == 0
    finally:
        engine.stop(JOIN_TIMEOUT)
    assert_released(llm)


def test_leaving_a_stream_early_aborts_it():
    llm = make_engine()
    finished = []
    llm.request_listeners.append(finished.append)
    engine = AsyncEngine(llm)
    try:

        async def main():
            num_outputs = 0
            async for _ in engine.stream(PROMPTS[0], greedy(400)):
                num_outputs += 1
                if num_outputs == 2:
                    break
            await until(engine, lambda: finished and engine.is_idle)

        asyncio.run(main())
        (stats,) = finished
        assert stats.finish_reason == "abort"
        assert 2 <= stats.num_output_tokens < 400
        assert llm.stats().kv_reserved_tokens == 0
        assert engine.num_streams == 0
    finally:
        engine.stop(JOIN_TIMEOUT)
    assert_released(llm)


def test_unknown_adapter_raises_from_the_stream():
    engine = AsyncEngine(make_engine())
    try:

        async def main():
            with pytest.raises(AdapterNotFoundError):
                await collect(engine, PROMPTS[0], greedy(), "missing")
            return await collect(engine, PROMPTS[0], greedy(2))  # the loop survives the error

        outputs = asyncio.run(main())
        assert outputs[-1].finish_reason == "length"
        assert engine.num_streams == 0
    finally:
        engine.stop(JOIN_TIMEOUT)


def test_a_failing_step_aborts_running_requests_and_the_loop_goes_on():
    llm = make_engine()
    run = llm.runner.run
    calls = []

    def fail_second_step(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return run(*args, **kwargs)

    llm.runner.run = fail_second_step
    engine = AsyncEngine(llm)
    try:

        async def main():
            failed = await collect(engine, PROMPTS[0], greedy(5))
            return failed, await collect(engine, PROMPTS[1], greedy(3))

        failed, after = asyncio.run(main())
        assert [len(o.token_ids) for o in failed] == [1, 0]
        assert failed[-1].finish_reason == "abort" and isinstance(failed[-1].error, EngineFailedError)
        assert "RuntimeError" in str(failed[-1].error)
        assert after[-1].finish_reason == "length" and after[-1].num_output_tokens == 3
    finally:
        engine.stop(JOIN_TIMEOUT)
    assert_released(llm)


def test_stop_finishes_running_requests_then_ends_the_thread():
    llm = make_engine()
    engine = AsyncEngine(llm)
    try:

        async def main():
            stream = engine.stream(PROMPTS[0], greedy(6))
            outputs = [await anext(stream)]
            stopping = asyncio.create_task(asyncio.to_thread(engine.stop, JOIN_TIMEOUT))
            outputs += [output async for output in stream]
            await stopping
            with pytest.raises(EngineStoppedError):
                await collect(engine, PROMPTS[1], greedy())
            return outputs

        outputs = asyncio.run(main())
        assert outputs[-1].finish_reason == "length"
        assert sum(len(o.token_ids) for o in outputs) == 6
        assert not engine.is_alive
    finally:
        engine.stop(JOIN_TIMEOUT)
    assert_released(llm)


def test_reused_request_id_is_refused_without_hijacking_the_first_stream():
    engine = AsyncEngine(make_engine())
    try:

        async def main():
            first = await engine.submit(PROMPTS[0], greedy(5), request_id="x")
            with pytest.raises(RequestError) as info:
                await engine.submit(PROMPTS[1], greedy(5), request_id="x")
            assert info.value.field == "request_id"
            await until(engine, lambda: engine.is_idle)
            await asyncio.sleep(0)  # let the outputs already posted reach the queue
            assert first.num_pending == 5  # the first stream still gets every delta
            return [output async for output in first]

        outputs = asyncio.run(main())
        assert outputs[-1].finish_reason == "length"
    finally:
        engine.stop(JOIN_TIMEOUT)


def test_a_cancelled_call_never_runs_and_never_stops_the_engine_thread():
    llm = make_engine()
    engine = AsyncEngine(llm)
    gate, taken, ran = threading.Event(), threading.Event(), []
    try:

        async def main():
            def block():  # holds the engine thread until the gate opens
                taken.set()
                return gate.wait(JOIN_TIMEOUT)

            blocker = asyncio.ensure_future(engine.call(block))
            assert await asyncio.to_thread(taken.wait, JOIN_TIMEOUT)  # the engine thread has taken the blocker
            cancelled = asyncio.ensure_future(engine.call(lambda: ran.append("ran")))
            await asyncio.sleep(0)  # a loop turn, not a wait: the task submits its command
            cancelled.cancel()
            # The cancel reaches the command's concurrent future through a loop callback: let it land
            # (the caller has given up) before the engine thread is free to pick the command up.
            await asyncio.wait([cancelled])
            gate.set()
            await blocker
            return await collect(engine, PROMPTS[0], greedy(3))

        outputs = asyncio.run(main())
        assert ran == [] and engine.is_alive
        assert outputs[-1].finish_reason == "length"
    finally:
        gate.set()
        engine.stop(JOIN_TIMEOUT)
    assert_released(llm)


def test_a_dead_engine_thread_fails_every_caller_and_reports_itself():
    llm, fatal = make_engine(), []
    break_loop_when_busy(llm)
    engine = AsyncEngine(llm, on_fatal=fatal.append)

    async def main():
        outputs = await collect(engine, PROMPTS[0], greedy(50))
        with pytest.raises(EngineDeadError):
            await engine.submit(PROMPTS[1], greedy(3))
        return outputs

    outputs = asyncio.run(main())
    engine.stop(JOIN_TIMEOUT)
    assert outputs[-1].finished and isinstance(outputs[-1].error, EngineDeadError)
    assert not engine.is_alive and len(fatal) == 1 and "injected" in repr(fatal[0])


def test_an_idle_engine_hands_freed_memory_back_once_per_burst(monkeypatch):
    """After work and a quiet spell the loop trims the allocator once; idle without work, never again."""
    from server.engine import async_engine, host_memory  # noqa: PLC0415

    trims = []
    monkeypatch.setattr(async_engine, "IDLE_TRIM_SECONDS", 0.05)
    monkeypatch.setattr(async_engine, "give_back", lambda: trims.append(host_memory.give_back()))
    llm = make_engine()
    engine = AsyncEngine(llm)
    try:
        for burst in (1, 2):
            asyncio.run(collect(engine, PROMPTS[0], greedy(4)))
            for _ in range(200):  # the trim comes 0.05 s after the step; allow a loaded machine 10 s
                if len(trims) == burst:
                    break
                threading.Event().wait(0.05)
            threading.Event().wait(0.3)  # idle far past the pause: still one trim per burst
            assert len(trims) == burst
    finally:
        engine.stop(JOIN_TIMEOUT)
    assert_released(llm)


def test_ran_adapter_answers_once_a_step_that_ran_the_adapter_is_over(adapter_paths):
    """A resolved adapter's store write waits on this: False while no step has run the adapter (after
    `within_s`), True once one has, and by then that step's token has been sampled."""
    llm = make_engine(adapter_paths)
    engine = AsyncEngine(llm)
    try:

        async def main():
            assert not await engine.ran_adapter("a", within_s=0.2)  # registered, never run
            waiting = asyncio.ensure_future(engine.ran_adapter("a", within_s=JOIN_TIMEOUT))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            stream = engine.stream(PROMPTS[0], greedy(4), AdapterRef.of("a"))
            first = await anext(stream)
            assert await waiting
            await stream.aclose()
            return first

        assert asyncio.run(main()).token_ids
        assert asyncio.run(engine.ran_adapter("gone", within_s=0)) is True  # nothing left to wait for
    finally:
        engine.stop(JOIN_TIMEOUT)
