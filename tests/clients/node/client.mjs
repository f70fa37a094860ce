// The official `openai` npm package against ccwrap-trio: one plain and one streamed completion.
//
//   node client.mjs http://127.0.0.1:PORT/v1
//
// Prints ONE JSON line to stdout with what the SDK returned; exits non-zero (the error on
// stderr) on any error. Run by tests/clients/test_node_client.py.
import OpenAI from "openai";

const baseURL = process.argv[2];
if (!baseURL) {
  console.error("usage: node client.mjs BASE_URL  (e.g. http://127.0.0.1:8204/v1)");
  process.exit(2);
}

const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 120_000 });

async function plain() {
  const completion = await client.chat.completions.create({
    model: "haiku",
    messages: [{ role: "user", content: "plain hello from node" }],
  });
  const choice = completion.choices[0];
  return {
    object: completion.object,
    content: choice.message.content,
    role: choice.message.role,
    finish_reason: choice.finish_reason,
    usage: completion.usage ?? null,
  };
}

async function streamed() {
  const stream = await client.chat.completions.create({
    model: "haiku",
    messages: [{ role: "user", content: "streamed hello from node in several words [standin:delay=0.05]" }],
    stream: true,
    stream_options: { include_usage: true },
  });
  let chunks = 0; // chunks that carried content text
  let total = 0; // every chunk, the role-only and usage-only ones included
  let content = "";
  const roles = [];
  const objects = new Set();
  const ids = new Set();
  let finishReason = null;
  let usage = null;
  let usageChunkChoices = null;
  for await (const chunk of stream) {
    total += 1;
    objects.add(chunk.object);
    ids.add(chunk.id);
    for (const choice of chunk.choices ?? []) {
      const delta = choice.delta ?? {};
      if (delta.role) roles.push(delta.role);
      if (delta.content) {
        chunks += 1;
        content += delta.content;
      }
      if (choice.finish_reason) finishReason = choice.finish_reason;
    }
    if (chunk.usage) {
      usage = chunk.usage;
      usageChunkChoices = (chunk.choices ?? []).length;
    }
  }
  return {
    chunks,
    total_chunks: total,
    content,
    roles,
    objects: [...objects],
    ids: ids.size,
    finish_reason: finishReason,
    usage,
    usage_chunk_choices: usageChunkChoices,
  };
}

try {
  const result = { plain: await plain(), stream: await streamed() };
  process.stdout.write(JSON.stringify(result) + "\n");
} catch (err) {
  console.error(`openai (node) failed: ${err?.constructor?.name ?? "Error"}: ${err?.message ?? err}`);
  if (err?.status !== undefined) console.error(`status: ${err.status}`);
  if (err?.error !== undefined) console.error(`body: ${JSON.stringify(err.error)}`);
  if (err?.stack) console.error(err.stack);
  process.exit(1);
}
