/**
 * Reading the service password on the client side: never from argv. Either from standard
 * input (`--password-stdin`, one password per line) or from a prompt on the terminal with
 * echo off. The prompt's package is loaded only when a prompt is shown.
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

/**
 * Prompt on the terminal without echo (on stderr, so stdout stays the command's output). The
 * line editing (backspace, paste, escape sequences, Ctrl+C, Ctrl+D) is @inquirer/password's.
 * Fails with EINVAL when stdin is not a terminal, and when the prompt is given up.
 */
export async function promptHidden(question: string): Promise<string> {
  if (!process.stdin.isTTY) {
    throw new BdsnapError('EINVAL', 'no terminal to ask for the password: use --password-stdin');
  }
  const { default: password } = await import('@inquirer/password');
  try {
    return await password(
      { message: question.trimEnd(), mask: false, toggleMask: false, theme: { prefix: '', style: { message: (text: string) => text } } },
      { input: process.stdin, output: process.stderr, clearPromptOnDone: false },
    );
  } catch (err) {
    const name = (err as Error).name;
    if (name === 'ExitPromptError' || name === 'AbortPromptError' || name === 'CancelPromptError') {
      throw new BdsnapError('EINVAL', 'interrupted: no password was given', { cause: err });
    }
    throw err;
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
