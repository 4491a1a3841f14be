/**
 * Options whose values are checked as commander parses them: one of a fixed list (shown in
 * --help), or a size. A bad value is EINVAL naming the option, like every other bad value the
 * CLI meets (exit 1, one line), not one of commander's usage errors.
 */

import { Option } from 'commander';
import { BdsnapError } from '../errors.js';
import { parseBytes } from '../units.js';

/** "a, b or c". */
function alternatives(choices: readonly string[]): string {
  return choices.length > 1 ? `${choices.slice(0, -1).join(', ')} or ${choices.at(-1)}` : choices.join('');
}

/** An option that takes one of `choices`; --help lists them. */
export function choiceOption(flags: string, description: string, choices: readonly string[]): Option {
  const option = new Option(flags, description).choices(choices);
  return option.argParser((value: string) => {
    if (!choices.includes(value)) throw new BdsnapError('EINVAL', `bad ${option.long} "${value}": expected ${alternatives(choices)}`);
    return value;
  });
}

/** An option that takes a size ("65536", "64K", "1M"), parsed to bytes; `check` may refuse more. */
export function sizeOption(flags: string, description: string, check?: (bytes: number) => void): Option {
  const option = new Option(flags, description);
  return option.argParser((value: string) => {
    const bytes = parseBytes(value, option.long ?? flags);
    if (check) {
      try {
        check(bytes);
      } catch (err) {
        throw new BdsnapError('EINVAL', `bad ${option.long}: ${(err as Error).message}`, { cause: err });
      }
    }
    return bytes;
  });
}
