/**
 * Reading the service password on the client side: never from argv. Either from standard
 * input (`--password-stdin`, one password per line) or from a prompt on the terminal with
 * echo off.
 */

import { BdsnapError } from '../errors.js';

/** Read all of stdin and split it into lines (without their line ends). */
export async function readStdinLines(maxBytes = 64 * 1024): Promise<string[]> {
  const parts: Buffer[] = [];
  let total = 0;
  for await (const chunk of process.stdin) {
    const buf = chunk as Buffer;
    total += buf.length;
    if (total > maxBytes) throw new BdsnapError('EINVAL', 'standard input is too long for a password');
    parts.push(buf);
  }
  const text = Buffer.concat(parts).toString('utf8');
  const lines = text.split(/\r?\n/);
  if (lines.length > 0 && lines[lines.length - 1] === '') lines.pop();
  return lines;
}

/** Prompt on the terminal without echo. Fails with EINVAL when stdin is not a terminal. */
export async function promptHidden(question: string): Promise<string> {
  const stdin = process.stdin;
  if (!stdin.isTTY) {
    throw new BdsnapError('EINVAL', 'no terminal to ask for the password: use --password-stdin');
  }
  // Echo goes off before the prompt shows, so an answer typed at once is not echoed either.
  stdin.setRawMode(true);
  process.stderr.write(question);
  stdin.resume();
  let answer = '';
  try {
    return await new Promise<string>((resolve, reject) => {
      const onData = (chunk: Buffer): void => {
        for (const ch of chunk.toString('utf8')) {
          if (ch === '\r' || ch === '\n') {
            stdin.off('data', onData);
            resolve(answer);
            return;
          }
          if (ch === '\u0003') {
            stdin.off('data', onData);
            reject(new BdsnapError('EINVAL', 'interrupted'));
            return;
          }
          if (ch === '\u007f' || ch === '\b') answer = answer.slice(0, -1);
          else answer += ch;
        }
      };
      stdin.on('data', onData);
    });
  } finally {
    stdin.setRawMode(false);
    stdin.pause();
    process.stderr.write('\n');
  }
}

/** One password: the first line of stdin, or a prompt. */
export async function readPassword(fromStdin: boolean, question = 'bdsnap service password: '): Promise<string> {
  if (fromStdin) {
    const [first] = await readStdinLines();
    if (first === undefined || first === '') throw new BdsnapError('EINVAL', 'no password on standard input');
    return first;
  }
  return promptHidden(question);
}
