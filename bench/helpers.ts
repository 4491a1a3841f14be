/**
 * What the benchmarks take from testkit/: images, processes, servers, the daemon, fio, scratch
 * filesystems, the skip policy and the fuzz campaigns. The benchmarks drive bdsnap as the tests
 * do, so both share one copy of each there; bench/ never imports test/.
 */

export { CleanupStack } from '../testkit/cleanup.js';
export { TEST_REPO_PASSWORD, sandbox, startDaemon, type RunningDaemon, type Sandbox } from '../testkit/daemon.js';
export { dirBytes, makeImage } from '../testkit/files.js';
export { runFio, type FioJob } from '../testkit/fio.js';
export { missingNeeds } from '../testkit/needs.js';
export { run } from '../testkit/process.js';
export { MIN_SCRATCH_FS_BYTES, mountScratchFs, scratchFsNeeds } from '../testkit/scratch-fs.js';
export { BDSNAP_MAIN, launchServer, nbdUri, startServer, type NbdServer } from '../testkit/server.js';
export { makePki } from '../testkit/tls.js';
export { ServeSnapshotProvider } from '../testkit/snapshot-provider.js';
export { runControlCampaign } from '../testkit/fuzz/control-campaign.js';
export { gauge, runNbdCampaign } from '../testkit/fuzz/nbd-campaign.js';
