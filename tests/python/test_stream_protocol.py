"""The RabbitMQ Stream protocol (port 5552) with rstream, the Python stream client: publish
with confirms, every offset specification, deduplication across a publisher restart,
stored offsets (shared with AMQP 0-9-1's "stored" consumers), filtering, retention
arguments, errors, a stream written over AMQP 0-9-1 read over the Stream protocol and the
other way round, and kill -9 while publishing: nothing confirmed is lost, offsets stay
contiguous."""

import asyncio
import os
import signal
import threading
import time

import pika
import pytest
from rstream import (AMQPMessage, Consumer, ConsumerOffsetSpecification, OffsetType, Producer,
                     amqp_decoder)
from rstream.exceptions import StreamAlreadyExists, StreamDoesNotExist

from helpers import Broker, BrokerProcess, render_config, uniq

WAIT = 15


@pytest.fixture
def stream_broker(tmp_path):
    """A broker with AMQP and the Stream protocol on port 0; `.stream` is (host, port),
    `.proc` the process (for kill -9 and restart)."""
    workdir = tmp_path / "broker"
    (workdir / "data").mkdir(parents=True)
    proc = BrokerProcess(workdir, render_config(workdir / "data", listeners=("stream",)))
    started = []

    def start():
        if proc.ready_path.exists():
            proc.ready_path.unlink()
        host, port = proc.start()
        b = Broker(host, port, log_path=proc.log_path)
        h, _, p = proc.ready["stream"].rpartition(":")
        b.stream = (h.strip("[]"), int(p))
        b.proc = proc
        b.restart_after_kill = lambda: (proc.proc.kill(), proc.proc.wait(), start())[-1]
        started.append(b)
        return b

    yield start()
    for b in started:
        b.close_all()
    proc.stop()


def producer(b, **kw):
    host, port = b.stream
    return Producer(host, port=port, username="guest", password="guest", **kw)


def first():
    return ConsumerOffsetSpecification(OffsetType.FIRST, None)


async def consume(b, stream, n, spec=None, quiet=0.0, **kw):
    """The first `n` messages a new subscription gets, as (offset, AMQPMessage); with
    `quiet`, also waits that long for messages beyond `n` (there must be none)."""
    got = []
    done = asyncio.Event()

    async def on_message(msg, ctx):
        got.append((ctx.offset, msg))
        if len(got) >= n:
            done.set()

    host, port = b.stream
    c = Consumer(host, port=port, username="guest", password="guest")
    await c.start()
    try:
        await c.subscribe(stream, on_message, decoder=amqp_decoder,
                          offset_specification=spec or first(), **kw)
        if n:
            await asyncio.wait_for(done.wait(), WAIT)
        if quiet:
            await asyncio.sleep(quiet)
    finally:
        await c.close()
    return got


def with_id(message, publishing_id):
    """`message` with an explicit publishing id (rstream's AMQPMessage takes it as an
    attribute, not as a constructor argument)."""
    message.publishing_id = publishing_id
    return message


def body(msg):
    """The body of a decoded AMQP 1.0 message (one data section)."""
    b = msg.body
    return b"".join(b) if isinstance(b, list) else bytes(b)


@pytest.fixture
def stream(stream_broker):
    """A new stream on the broker (its name)."""
    name = uniq("s")

    async def create():
        async with producer(stream_broker) as p:
            await p.create_stream(name)

    asyncio.run(create())
    return name


def test_confirms_and_contiguous_offsets_from_first(stream_broker, stream):
    async def run():
        confirmed = []
        async with producer(stream_broker) as p:
            await p.send_wait(stream, AMQPMessage(body=b"m0"))
            await p.send_batch(stream, [AMQPMessage(body=f"m{i}".encode()) for i in range(1, 200)],
                               on_publish_confirm=lambda s: confirmed.append(s))
            deadline = time.monotonic() + WAIT
            while sum(1 for s in confirmed if s.is_confirmed) < 199:
                assert time.monotonic() < deadline, "confirms missing"
                await asyncio.sleep(0.05)
        got = await consume(stream_broker, stream, 200)
        assert [o for o, _ in got] == list(range(200))
        assert [body(m) for _, m in got] == [f"m{i}".encode() for i in range(200)]

    asyncio.run(run())


def test_offset_specifications(stream_broker, stream):
    async def run():
        async with producer(stream_broker) as p:
            for i in range(10):
                await p.send_wait(stream, AMQPMessage(body=f"a{i}".encode()))
            got = await consume(stream_broker, stream, 4,
                                ConsumerOffsetSpecification(OffsetType.OFFSET, 6), quiet=0.3)
            assert [o for o, _ in got] == [6, 7, 8, 9]
            # last: the start of the last chunk written (here the last message).
            got = await consume(stream_broker, stream, 1,
                                ConsumerOffsetSpecification(OffsetType.LAST, None))
            assert got[0][0] == 9
            # timestamp (ms): what was written from then on.
            await asyncio.sleep(0.3)
            since = int(time.time() * 1000)
            await p.send_wait(stream, AMQPMessage(body=b"late"))
            got = await consume(stream_broker, stream, 1,
                                ConsumerOffsetSpecification(OffsetType.TIMESTAMP, since))
            assert body(got[0][1]) == b"late" and got[0][0] == 10

            # next: only what is written after subscribing.
            got, done = [], asyncio.Event()

            async def on_message(msg, ctx):
                got.append((ctx.offset, body(msg)))
                done.set()

            host, port = stream_broker.stream
            c = Consumer(host, port=port, username="guest", password="guest")
            await c.start()
            await c.subscribe(stream, on_message, decoder=amqp_decoder,
                              offset_specification=ConsumerOffsetSpecification(OffsetType.NEXT,
                                                                               None))
            await asyncio.sleep(0.3)
            assert got == []
            await p.send_wait(stream, AMQPMessage(body=b"new"))
            await asyncio.wait_for(done.wait(), WAIT)
            assert got == [(11, b"new")]
            await c.close()

    asyncio.run(run())


def test_deduplication_across_a_publisher_restart(stream_broker, stream):
    async def run():
        async with producer(stream_broker) as p:
            for i in (1, 2, 3):
                await p.send_wait(stream, with_id(AMQPMessage(body=f"d{i}".encode()), i),
                                  publisher_name="dedup")
        async with producer(stream_broker) as p:
            # Already stored under this reference: confirmed, not stored again.
            await p.send_wait(stream, with_id(AMQPMessage(body=b"again"), 2),
                              publisher_name="dedup")
            # A new producer continues after the highest id the broker has (3).
            await p.send_wait(stream, AMQPMessage(body=b"d4"), publisher_name="dedup")
        got = await consume(stream_broker, stream, 4, quiet=0.3)
        assert [body(m) for _, m in got] == [b"d1", b"d2", b"d3", b"d4"]

    asyncio.run(run())


def test_stored_offsets_are_shared_with_amqp_stored_consumers(stream_broker, stream):
    async def run():
        async with producer(stream_broker) as p:
            for i in range(5):
                await p.send_wait(stream, AMQPMessage(body=f"o{i}".encode()))
        host, port = stream_broker.stream
        c = Consumer(host, port=port, username="guest", password="guest")
        await c.start()
        with pytest.raises(Exception):
            await c.query_offset(stream, "reader-1")
        await c.store_offset(stream, "reader-1", 2)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                if await c.query_offset(stream, "reader-1") == 2:
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await c.close()

    asyncio.run(run())
    # An AMQP 0-9-1 consumer tagged "reader-1" resumes after what the stream client stored.
    ch = stream_broker.connect().channel()
    ch.basic_qos(prefetch_count=10)
    got = []
    ch.basic_consume(stream, lambda c, m, props, b: got.append(b), consumer_tag="reader-1",
                     arguments={"x-stream-offset": "stored"})
    deadline = time.monotonic() + WAIT
    while len(got) < 2 and time.monotonic() < deadline:
        ch.connection.process_data_events(time_limit=0.1)
    assert got == [b"o3", b"o4"]


def test_amqp_091_and_the_stream_protocol_read_each_others_messages(stream_broker):
    name = uniq("x")
    ch = stream_broker.connect().channel()
    ch.queue_declare(name, durable=True, arguments={"x-queue-type": "stream"})
    ch.confirm_delivery()
    ch.basic_publish("", name, b"from-amqp",
                     pika.BasicProperties(content_type="text/plain", message_id="m-1",
                                          correlation_id="c-1", delivery_mode=2,
                                          headers={"color": "red", "n": 7}))

    async def run():
        got = await consume(stream_broker, name, 1)
        offset, m = got[0]
        assert offset == 0 and body(m) == b"from-amqp"
        assert m.properties.content_type == b"text/plain"
        assert m.properties.message_id == b"m-1"
        assert m.properties.correlation_id == b"c-1"
        assert m.header.durable is True
        props = {(k.decode() if isinstance(k, bytes) else k): v
                 for k, v in m.application_properties.items()}
        assert props["color"] in ("red", b"red") and props["n"] == 7
        async with producer(stream_broker) as p:
            await p.send_wait(name, AMQPMessage(
                body=b"from-stream", application_properties={"k": "v"}))

    asyncio.run(run())
    ch = stream_broker.connect().channel()
    ch.basic_qos(prefetch_count=10)
    got = []
    ch.basic_consume(name, lambda c, m, props, b: got.append((props, b)),
                     arguments={"x-stream-offset": 1})
    deadline = time.monotonic() + WAIT
    while not got and time.monotonic() < deadline:
        ch.connection.process_data_events(time_limit=0.1)
    props, b = got[0]
    assert b == b"from-stream"
    assert props.headers["k"] == "v" and props.headers["x-stream-offset"] == 1


def test_filtering_delivers_only_matching_chunks_values(stream_broker, stream):
    from rstream import FilterConfiguration

    async def filter_value(m):
        return m.application_properties["f"]

    async def run():
        async with producer(stream_broker, filter_value_extractor=filter_value) as p:
            for f in ("a", "b", "a", "b"):
                # One chunk per message: confirmed before the next is sent.
                await p.send_wait(stream, AMQPMessage(body=f.encode(),
                                                      application_properties={"f": f}))
        got = await consume(stream_broker, stream, 2, quiet=0.3, filter_input=FilterConfiguration(
            values_to_filter=["a"],
            predicate=lambda m: m.application_properties[b"f"] == b"a"))
        assert [body(m) for _, m in got] == [b"a", b"a"]

    asyncio.run(run())


def test_batches_are_read_as_stored_from_inside_a_chunk_and_filtered_for_amqp(
        stream_broker, stream):
    """Stream publishes are stored as the client's AMQP 1.0 bytes, several per chunk: a
    subscription from an offset inside the chunk gets the rest of it, and AMQP 0-9-1
    consumers get them converted, filtered per message by the publish's filter value
    (kept beside the bytes), with the value in `x-stream-filter-value`."""

    async def filter_value(m):
        return m.application_properties["f"]

    async def run():
        async with producer(stream_broker, filter_value_extractor=filter_value) as p:
            await p.send_batch(stream, [
                AMQPMessage(body=f"m{i}".encode(), application_properties={"f": "ab"[i % 2]})
                for i in range(6)])
        got = await consume(stream_broker, stream, 6)
        assert [(o, body(m)) for o, m in got] == [(i, f"m{i}".encode()) for i in range(6)]
        got = await consume(stream_broker, stream, 3, quiet=0.3,
                            spec=ConsumerOffsetSpecification(OffsetType.OFFSET, 3))
        assert [(o, body(m)) for o, m in got] == [(i, f"m{i}".encode()) for i in (3, 4, 5)]

    asyncio.run(run())
    ch = stream_broker.connect().channel()
    ch.basic_qos(prefetch_count=10)
    got = []
    ch.basic_consume(stream, lambda c, m, props, b: got.append((props, b)),
                     arguments={"x-stream-offset": "first", "x-stream-filter": "b"})
    deadline = time.monotonic() + WAIT
    while len(got) < 3 and time.monotonic() < deadline:
        ch.connection.process_data_events(time_limit=0.1)
    ch.connection.process_data_events(time_limit=0.3)
    assert [b for _, b in got] == [b"m1", b"m3", b"m5"]
    assert [p.headers["x-stream-offset"] for p, _ in got] == [1, 3, 5]
    assert all(p.headers["x-stream-filter-value"] == "b" for p, _ in got)


def test_create_delete_and_errors(stream_broker):
    name = uniq("c")

    async def run():
        async with producer(stream_broker) as p:
            await p.create_stream(name, arguments={"max-length-bytes": 10_000_000,
                                                   "max-age": "1h"})
            with pytest.raises(StreamAlreadyExists):
                await p.create_stream(name)
            assert await p.stream_exists(name)
            await p.delete_stream(name)
            assert not await p.stream_exists(name)
            with pytest.raises(StreamDoesNotExist):
                await p.send_wait(name, AMQPMessage(body=b"x"))
        with pytest.raises(Exception):
            async with Producer(*stream_broker.stream[:1], port=stream_broker.stream[1],
                                username="guest", password="wrong"):
                pass

    asyncio.run(run())
    # The AMQP side sees the arguments it was created with.
    ch = stream_broker.connect().channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        ch.queue_declare(name, passive=True)


def test_kill_9_while_publishing_loses_nothing_confirmed(stream_broker, stream):
    confirmed = set()
    stop = threading.Event()

    async def publish():
        try:
            async with producer(stream_broker) as p:
                i = 0
                while not stop.is_set():
                    batch = [AMQPMessage(body=f"k{i + j}".encode()) for j in range(50)]
                    i += 50

                    def on_confirm(status, batch=batch):
                        if status.is_confirmed:
                            confirmed.add(status.message_id)

                    await p.send_batch(stream, batch, on_publish_confirm=on_confirm)
                    await asyncio.sleep(0.001)
        except Exception:
            pass  # the broker went away

    t = threading.Thread(target=lambda: asyncio.run(publish()), daemon=True)
    t.start()
    deadline = time.monotonic() + WAIT
    while len(confirmed) < 500 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(confirmed) >= 500
    os.kill(stream_broker.proc.proc.pid, signal.SIGKILL)
    stream_broker.proc.proc.wait()
    stop.set()
    t.join(WAIT)
    seen = set(confirmed)
    b = stream_broker.restart_after_kill()

    ch = b.connect().channel()
    total = ch.queue_declare(stream, durable=True, passive=True).method.message_count
    got = asyncio.run(consume(b, stream, total))
    # Everything kept, from offset 0, contiguous; publishing ids start at 1, one per
    # message in order, so the message confirmed as id n is at offset n - 1.
    offsets = [o for o, _ in got]
    assert offsets == list(range(total))
    assert max(seen) <= total
    for n in seen:
        assert body(got[n - 1][1]) == f"k{n - 1}".encode()
