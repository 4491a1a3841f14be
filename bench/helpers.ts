/**
 * What the benchmarks take from the test helpers: images, processes, servers, the daemon, fio,
 * scratch filesystems and the skip policy. The benchmarks drive bdsnap as the tests do, so they
 * share one copy of each, and this file is the one place where bench/ reaches into test/.
 */

export { dirBytes } from '../test/backup/helpers.js';
export { CleanupStack } from '../test/helpers/cleanup.js';
export { TEST_REPO_PASSWORD, sandbox, startDaemon, type RunningDaemon, type Sandbox } from '../test/helpers/daemon.js';
export { makeImage } from '../test/helpers/files.js';
export { runFio, type FioJob } from '../test/helpers/fio.js';
export { missingNeeds } from '../test/helpers/needs.js';
export { run } from '../test/helpers/process.js';
export { MIN_SCRATCH_FS_BYTES, mountScratchFs, scratchFsNeeds } from '../test/helpers/scratch-fs.js';
export { BDSNAP_MAIN, launchServer, nbdUri, startServer, type NbdServer } from '../test/helpers/server.js';
export { makePki } from '../test/helpers/tls.js';
export { ServeSnapshotProvider } from '../test/backup/helpers.js';
export { runControlCampaign } from '../test/fuzz/control-campaign.js';
export { gauge, runNbdCampaign } from '../test/fuzz/nbd-campaign.js';
