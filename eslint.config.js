// Lint rules: typescript-eslint's recommended set over the sources, test kit, tests and benchmarks, and
// the direction of imports between the layers of src/ (DESIGN.md, "Layers and what each may
// touch"): each folder lists what it must not import. Shared by every layer: src/errors.ts,
// src/unix-socket.ts and src/host/ (which itself imports nothing of ours but errors.ts).
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

/** Every folder of src/ that is a layer, as it appears in an import path. */
const LAYERS = ['host', 'device', 'nbd', 'snapshot', 'service', 'cli', 'backup', 'fs/singlefilefs'];

/**
 * A no-restricted-imports rule: `forbidden` layers may not be imported at all; `only` maps a
 * layer to the files of it that may be imported (the rest of that layer is forbidden).
 */
function layerRule(layer, forbidden, only = {}) {
  const patterns = forbidden.map((name) => ({
    group: [`**/${name}/**`],
    message: `${layer} may not import from src/${name}/ (DESIGN.md: arrows point down)`,
  }));
  for (const [name, files] of Object.entries(only)) {
    patterns.push({
      group: [`**/${name}/**`, ...files.map((f) => `!**/${name}/${f}`)],
      message: `${layer} may import only ${files.join(', ')} from src/${name}/ (DESIGN.md)`,
    });
  }
  return { 'no-restricted-imports': ['error', { patterns }] };
}

const others = (...allowed) => LAYERS.filter((l) => !allowed.includes(l));

export default tseslint.config(
  { ignores: ['dist/', 'node_modules/'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      'no-constant-condition': ['error', { checkLoops: false }],
    },
  },
  { files: ['src/host/**'], rules: layerRule('host', others('host')) },
  { files: ['src/device/**'], rules: layerRule('device', others('host', 'device')) },
  { files: ['src/nbd/**'], rules: layerRule('nbd', others('host', 'nbd', 'device'), { device: ['block-device.js', 'buffer-pool.js'] }) },
  { files: ['src/snapshot/**'], rules: layerRule('snapshot', others('host', 'snapshot', 'device')) },
  { files: ['src/service/**'], rules: layerRule('service', ['cli', 'backup', 'fs/singlefilefs']) },
  {
    files: ['src/backup/**'],
    rules: layerRule('backup', others('host', 'backup', 'device', 'service', 'nbd'), {
      service: ['client.js', 'control-protocol.js', 'paths.js'],
      nbd: ['client.js', 'constants.js'],
    }),
  },
  {
    files: ['src/fs/**'],
    rules: layerRule('fs/singlefilefs', others('host', 'fs/singlefilefs', 'device', 'nbd'), { nbd: ['client.js', 'constants.js'] }),
  },
  {
    // `serve` and `daemon` compose the layers below; of the service, the CLI uses the client
    // library (and the run directory's names and the words for what holds a device, which it
    // shares with the daemon) and starts the daemon or the daemonless server, nothing else.
    files: ['src/cli/**'],
    rules: layerRule('cli', [], { service: ['client.js', 'control-protocol.js', 'paths.js', 'device-holders.js', 'password-input.js', 'daemon.js', 'serve.js'] }),
  },
);
