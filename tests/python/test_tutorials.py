"""RabbitMQ tutorials 1-6, done the way the official pika tutorials do them.

Each "program" of a tutorial gets its own BlockingConnection; the test drives them in
one thread. Names carry a uuid suffix (the tutorials use fixed names like 'hello').
"""

import uuid

import pika

from helpers import drain_events, quiet_period


def _collect(ch, queue, auto_ack=True):
    got = []

    def callback(c, method, properties, body):
        got.append(body)
        if not auto_ack:
            c.basic_ack(delivery_tag=method.delivery_tag)

    ch.basic_consume(queue=queue, on_message_callback=callback, auto_ack=auto_ack)
    return got


def test_tutorial1_hello_world(broker, names):
    hello = names("hello")

    # send.py
    connection = broker.connect()
    channel = connection.channel()
    channel.queue_declare(queue=hello)
    channel.basic_publish(exchange="", routing_key=hello, body="Hello World!")
    connection.close()

    # receive.py
    connection = broker.connect()
    channel = connection.channel()
    channel.queue_declare(queue=hello)
    received = []

    def callback(ch, method, properties, body):
        received.append(body)
        ch.stop_consuming()

    channel.basic_consume(queue=hello, on_message_callback=callback, auto_ack=True)
    connection.call_later(5, channel.stop_consuming)  # bound the test
    channel.start_consuming()
    assert received == [b"Hello World!"]


def test_tutorial2_work_queues_fair_dispatch(broker, names):
    task_queue = names("task_queue")

    # two workers (worker.py), started before the tasks are sent
    workers = []
    for _ in range(2):
        conn = broker.connect()
        ch = conn.channel()
        ch.queue_declare(queue=task_queue, durable=True)
        ch.basic_qos(prefetch_count=1)
        w = {"conn": conn, "ch": ch, "got": [], "tags": []}

        def callback(c, method, properties, body, w=w):
            w["got"].append(body)
            w["tags"].append(method.delivery_tag)
            assert properties.delivery_mode == pika.DeliveryMode.Persistent.value

        ch.basic_consume(queue=task_queue, on_message_callback=callback)
        workers.append(w)
    busy, fast = workers

    # new_task.py, 10 times
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue=task_queue, durable=True)
    for i in range(10):
        ch.basic_publish(
            exchange="",
            routing_key=task_queue,
            body=f"task {i}",
            properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
        )
    conn.close()

    # The busy worker never acks (it is "working"): with prefetch 1 it holds one task
    # and every other task goes to the fast worker, which acks each one.
    def fast_acks():
        while fast["tags"]:
            fast["ch"].basic_ack(delivery_tag=fast["tags"].pop(0))
        return len(busy["got"]) + len(fast["got"]) == 10

    assert drain_events([busy["conn"], fast["conn"]], fast_acks, timeout=8), \
        (busy["got"], fast["got"])
    quiet_period([busy["conn"], fast["conn"]], 0.3)
    assert len(busy["got"]) == 1
    assert len(fast["got"]) == 9
    assert sorted(busy["got"] + fast["got"]) == sorted(f"task {i}".encode() for i in range(10))

    # The busy worker finishes; nothing is left and nothing is redelivered.
    busy["ch"].basic_ack(delivery_tag=busy["tags"][0])
    quiet_period([busy["conn"], fast["conn"]], 0.3)
    assert len(busy["got"]) + len(fast["got"]) == 10
    check = broker.connect().channel()
    ok = check.queue_declare(queue=task_queue, durable=True, passive=True)
    assert ok.method.message_count == 0
    assert ok.method.consumer_count == 2


def test_tutorial2_durable_queue_keeps_unacked_task_when_worker_dies(broker, names):
    task_queue = names("task_queue")
    conn = broker.connect()
    ch = conn.channel()
    ch.queue_declare(queue=task_queue, durable=True)
    ch.basic_publish(exchange="", routing_key=task_queue, body="important",
                     properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent))

    worker = broker.connect()
    wch = worker.channel()
    wch.basic_qos(prefetch_count=1)
    got = []
    wch.basic_consume(queue=task_queue,
                      on_message_callback=lambda c, m, p, b: got.append((m, b)))
    assert drain_events([worker], lambda: got, timeout=5)
    assert got[0][0].redelivered is False
    worker.close()  # dies without acking

    worker2 = broker.connect()
    wch2 = worker2.channel()
    wch2.basic_qos(prefetch_count=1)
    got2 = []

    def callback(c, m, p, b):
        got2.append((m, b))
        c.basic_ack(delivery_tag=m.delivery_tag)

    wch2.basic_consume(queue=task_queue, on_message_callback=callback)
    assert drain_events([worker2], lambda: got2, timeout=5)
    assert got2[0][1] == b"important"
    assert got2[0][0].redelivered is True


def test_tutorial3_publish_subscribe(broker, names):
    logs = names("logs")

    subscribers = []
    for _ in range(2):
        # receive_logs.py
        connection = broker.connect()
        channel = connection.channel()
        channel.exchange_declare(exchange=logs, exchange_type="fanout")
        result = channel.queue_declare(queue="", exclusive=True)
        queue_name = result.method.queue
        assert queue_name.startswith("amq.gen-")
        channel.queue_bind(exchange=logs, queue=queue_name)
        subscribers.append((connection, _collect(channel, queue_name), queue_name))
    assert subscribers[0][2] != subscribers[1][2]

    # emit_log.py
    connection = broker.connect()
    channel = connection.channel()
    channel.exchange_declare(exchange=logs, exchange_type="fanout")
    for msg in ("info: Hello World!", "warning: disk"):
        channel.basic_publish(exchange=logs, routing_key="", body=msg)
    connection.close()

    conns = [s[0] for s in subscribers]
    assert drain_events(conns, lambda: all(len(s[1]) == 2 for s in subscribers))
    quiet_period(conns, 0.2)
    for _, got, _ in subscribers:
        assert got == [b"info: Hello World!", b"warning: disk"]

    # the exclusive queues go away with their connections
    for c in conns:
        c.close()
    ch = broker.connect().channel()
    for _, _, q in subscribers:
        try:
            ch.queue_declare(queue=q, passive=True)
            raise AssertionError(f"exclusive queue {q} survived its connection")
        except pika.exceptions.ChannelClosedByBroker as e:
            assert e.reply_code == 404
        ch = broker.connect().channel()


def test_tutorial4_routing(broker, names):
    direct_logs = names("direct_logs")

    def receive_logs_direct(*severities):
        connection = broker.connect()
        channel = connection.channel()
        channel.exchange_declare(exchange=direct_logs, exchange_type="direct")
        result = channel.queue_declare(queue="", exclusive=True)
        queue_name = result.method.queue
        for severity in severities:
            channel.queue_bind(exchange=direct_logs, queue=queue_name, routing_key=severity)
        return connection, _collect(channel, queue_name)

    errors_conn, errors = receive_logs_direct("error")
    all_conn, everything = receive_logs_direct("info", "warning", "error")

    connection = broker.connect()
    channel = connection.channel()
    channel.exchange_declare(exchange=direct_logs, exchange_type="direct")
    for severity in ("info", "warning", "error", "debug"):
        channel.basic_publish(exchange=direct_logs, routing_key=severity,
                              body=f"{severity}: message")
    connection.close()

    conns = [errors_conn, all_conn]
    assert drain_events(conns, lambda: len(errors) == 1 and len(everything) == 3)
    quiet_period(conns, 0.2)
    assert errors == [b"error: message"]
    assert everything == [b"info: message", b"warning: message", b"error: message"]


def test_tutorial5_topics(broker, names):
    topic_logs = names("topic_logs")

    def receive_logs_topic(*binding_keys):
        connection = broker.connect()
        channel = connection.channel()
        channel.exchange_declare(exchange=topic_logs, exchange_type="topic")
        result = channel.queue_declare("", exclusive=True)
        queue_name = result.method.queue
        for binding_key in binding_keys:
            channel.queue_bind(exchange=topic_logs, queue=queue_name, routing_key=binding_key)
        return connection, _collect(channel, queue_name)

    receivers = {
        "all": receive_logs_topic("#"),
        "kern": receive_logs_topic("kern.*"),
        "critical": receive_logs_topic("*.critical"),
        "kern_and_critical": receive_logs_topic("kern.*", "*.critical"),
        "lazy": receive_logs_topic("lazy.#"),
        "orange": receive_logs_topic("*.orange.*"),
    }

    connection = broker.connect()
    channel = connection.channel()
    channel.exchange_declare(exchange=topic_logs, exchange_type="topic")
    keys = ["kern.critical", "kern.info", "cron.critical", "lazy", "lazy.orange.rabbit",
            "quick.orange.rabbit", "quick.orange.male.rabbit", "anonymous.info"]
    for key in keys:
        channel.basic_publish(exchange=topic_logs, routing_key=key, body=key)
    connection.close()

    expected = {
        "all": keys,
        "kern": ["kern.critical", "kern.info"],
        "critical": ["kern.critical", "cron.critical"],
        # bound twice, matched by both bindings: still one copy
        "kern_and_critical": ["kern.critical", "kern.info", "cron.critical"],
        "lazy": ["lazy", "lazy.orange.rabbit"],
        "orange": ["lazy.orange.rabbit", "quick.orange.rabbit"],
    }
    conns = [c for c, _ in receivers.values()]
    assert drain_events(conns, lambda: all(len(receivers[k][1]) >= len(v)
                                           for k, v in expected.items()))
    quiet_period(conns, 0.3)
    for name, want in expected.items():
        assert receivers[name][1] == [k.encode() for k in want], name


def test_tutorial6_rpc(broker, names):
    rpc_queue = names("rpc_queue")

    # rpc_server.py
    server_conn = broker.connect()
    server = server_conn.channel()
    server.queue_declare(queue=rpc_queue)

    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    def on_request(ch, method, props, body):
        n = int(body)
        response = fib(n)
        ch.basic_publish(exchange="", routing_key=props.reply_to,
                         properties=pika.BasicProperties(correlation_id=props.correlation_id),
                         body=str(response))
        ch.basic_ack(delivery_tag=method.delivery_tag)

    server.basic_qos(prefetch_count=1)
    server.basic_consume(queue=rpc_queue, on_message_callback=on_request)

    # rpc_client.py
    class FibonacciRpcClient:
        def __init__(self):
            self.connection = broker.connect()
            self.channel = self.connection.channel()
            result = self.channel.queue_declare(queue="", exclusive=True)
            self.callback_queue = result.method.queue
            self.channel.basic_consume(queue=self.callback_queue,
                                       on_message_callback=self.on_response, auto_ack=True)
            self.response = None
            self.corr_id = None

        def on_response(self, ch, method, props, body):
            if self.corr_id == props.correlation_id:
                self.response = body

        def call(self, n):
            self.response = None
            self.corr_id = str(uuid.uuid4())
            self.channel.basic_publish(
                exchange="", routing_key=rpc_queue,
                properties=pika.BasicProperties(reply_to=self.callback_queue,
                                                correlation_id=self.corr_id),
                body=str(n))
            assert drain_events([self.connection, server_conn],
                                lambda: self.response is not None, timeout=5)
            return int(self.response)

    client = FibonacciRpcClient()
    assert client.callback_queue.startswith("amq.gen-")
    assert client.call(10) == 55
    assert client.call(20) == 6765
    assert [client.call(i) for i in range(8)] == [0, 1, 1, 2, 3, 5, 8, 13]
