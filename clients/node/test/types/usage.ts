// Compiled (never run) by types.test.js with `tsc --noEmit --strict`: a TypeScript program that
// imports the package by its name, through package.json `exports` -> types/index.d.ts.
import {
  KuiperClient,
  KuiperError,
  DecodeStream,
  collect,
  status,
  type GenerateChunk,
  type SamplingParams,
  type TokenizerInfo,
} from '@kuiper/client';

async function main(): Promise<void> {
  const client = new KuiperClient({ inferenceAddress: 'localhost:50051', deadlineMs: 0 });
  const sampling: SamplingParams = { maxNewTokens: 8, temperature: 0, seed: '42', stop: ['\n'] };
  for await (const chunk of client.generate('Once upon a time', sampling)) {
    const c: GenerateChunk = chunk;
    const reason: 'LENGTH' | 'STOP' | 'EOS' | 'CANCELLED' | null = c.finishReason;
    console.log(c.text, c.tokenIds.length, reason, c.usage?.completionTokens);
  }
  const ids: number[] = await client.encode('hello');
  const batch: number[][] = await client.encode(['a', 'b']);
  const text: string = await client.decode(ids);
  const texts: string[] = await client.decode(batch, { skipSpecialTokens: true });
  const info: TokenizerInfo = await client.tokenizerInfo();
  const stream: DecodeStream = client.decodeStream({ deadlineMs: 5000 });
  const delta: string = await stream.push(ids, { contextIds: [1], skipSpecialTokens: true });
  const tail: string = await stream.finish();
  const deltas = await stream.send([{ sequenceId: 2n, ids: [3], finished: true }]);
  const key: string = deltas[0].sequenceId;
  await stream.close();
  const result = await collect(client.chat([{ role: 'user', content: 'hi' }]));
  console.log(text, texts, info.vocabSize, delta, tail, key, result.text, status.CANCELLED);
  try {
    await client.modelInfo();
  } catch (err) {
    if (err instanceof KuiperError) console.log(err.codeName, err.details);
  }
  // @ts-expect-error: snake_case keys are not SamplingParams
  client.generate('x', { max_new_tokens: 5 });
  // @ts-expect-error: a prompt is text or ids
  client.generate({ text: 'x' });
  // @ts-expect-error: internals are private
  client._unary;
  client.close();
}

void main;
