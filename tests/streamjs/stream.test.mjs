// The Node RabbitMQ Stream client (rabbitmq-stream-js-client) against Switchyard's Stream
// protocol. tests/python/test_stream_js.py starts the broker, publishes three messages over
// AMQP 0-9-1 into the stream FROM_AMQP, and sets STREAM_HOST, STREAM_PORT and FROM_AMQP.
import { test } from "node:test"
import assert from "node:assert/strict"
import rabbit from "rabbitmq-stream-js-client"

const { connect, Offset } = rabbit
const params = {
  hostname: process.env.STREAM_HOST,
  port: Number(process.env.STREAM_PORT),
  username: "guest",
  password: "guest",
  vhost: "/",
}

function collect(client, stream, n, offset) {
  return new Promise((resolve, reject) => {
    const got = []
    const timer = setTimeout(() => reject(new Error(`got ${got.length} of ${n}`)), 10000)
    client
      .declareConsumer({ stream, offset }, (message) => {
        got.push(message)
        if (got.length === n) {
          clearTimeout(timer)
          resolve(got)
        }
      })
      .catch(reject)
  })
}

test("publish with confirms and deduplication, consume from first", async () => {
  const client = await connect(params)
  const stream = `js-${Date.now()}`
  await client.createStream({ stream, arguments: { "max-age": "1h" } })
  const publisher = await client.declarePublisher({ stream, publisherRef: "js-pub" })
  const confirmed = new Set()
  publisher.on("publish_confirm", (err, ids) => {
    assert.equal(err, null)
    ids.forEach((id) => confirmed.add(id))
  })
  for (let i = 0; i < 100; i++) {
    // The client writes 0 as null and cannot read null or long back: counted from 1.
    await publisher.send(Buffer.from(`m${i}`), { applicationProperties: { i: i + 1 } })
  }
  await publisher.flush()
  const deadline = Date.now() + 10000
  while (confirmed.size < 100 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20))
  }
  assert.equal(confirmed.size, 100)
  assert.equal(await publisher.getLastPublishingId(), 100n)
  const got = await collect(client, stream, 100, Offset.first())
  assert.deepEqual(
    got.map((m) => m.content.toString()),
    [...Array(100).keys()].map((i) => `m${i}`),
  )
  assert.deepEqual(
    got.map((m) => m.offset),
    [...Array(100).keys()].map((i) => BigInt(i)),
  )
  assert.equal(got[7].applicationProperties.i, 8)
  await client.deleteStream({ stream })
  await client.close()
})

test("reads what AMQP 0-9-1 wrote, with its properties", async () => {
  const client = await connect(params)
  const got = await collect(client, process.env.FROM_AMQP, 3, Offset.offset(0n))
  assert.deepEqual(
    got.map((m) => m.content.toString()),
    ["a0", "a1", "a2"],
  )
  assert.equal(got[1].messageProperties.contentType, "text/plain")
  assert.equal(got[2].applicationProperties.n, "v2")
  await client.close()
})
