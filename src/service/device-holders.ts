/**
 * What holds a device the daemon has open, in the words a refusal uses: the holder by name, and
 * the command or the wait that frees it. The daemon's own refusals and the command line's
 * explanation of a device it found busy (src/cli/busy.ts, from `status`) say the same thing from
 * the same facts, so both come from here. No I/O, and nothing but types from the protocol: the
 * command line loads this without the daemon's modules.
 */

import { formatBytes } from '../units.js';
import type { AsOfViewStatus, DeviceStatus, InstantRestoreInfo } from './control-protocol.js';

/** Where to watch a running instant restore, and the event that says it is done. */
const WATCH_RESTORE = '\'bdsnap status\' shows its progress, \'bdsnap events --follow\' says restore-completed';

/**
 * Why `name` (a name of the target of `r`) is refused to anyone but the restore, and what to
 * do: wait for a running one, let go of a complete one that is still open, resume or give up a
 * stopped one.
 */
export function describeRestoreHold(r: InstantRestoreInfo, name: string = r.target): string {
  const named = `${name}${r.target !== name ? ` (${r.target})` : ''}`;
  const restore = `an instant restore from backup ${r.backup}`;
  const clients = r.connections ?? 0;
  const letGo = r.mountpoint ? `bdsnap umount ${r.mountpoint}` : `disconnect its ${clients} NBD client(s)`;
  switch (r.state) {
    case 'stopped':
    case 'abandoned':
      return `${named} is part way through ${restore} that is stopped, so it is refused to every client and holder (what it has not copied yet is neither the backup nor what was there before): ${r.error ?? 'see bdsnap status'}`;
    case 'complete':
      return `${named} is still open through the restore that wrote it (${restore}, complete, ${clients} client(s)${r.mountpoint ? `, mounted at ${r.mountpoint}` : ''}); it is an ordinary device again once they let go: ${letGo} first`;
    case 'failed':
      return `${named} is being restored by ${restore} that failed at its end (${r.error ?? 'see bdsnap status'}); the daemon resumes it at its next start, and until it is complete the device is served only through it`;
    case 'running':
      return `${named} is being restored by ${restore} (running, ${progress(r)}); until it is complete the device is served only through that restore, and nothing else may hold it: wait for it (${WATCH_RESTORE})${clients > 0 ? `, then ${letGo}: the device is an ordinary device again when the restore's last client lets go` : ''}`;
  }
}

/**
 * Why a mount of `r`'s target has no session of its own: it goes through the restore. `active`:
 * the device is active, so the first mount after the restore gets a session again.
 */
export function describeRestoreMount(r: InstantRestoreInfo, active: boolean): string {
  const through = r.state === 'running'
    ? `the mount goes through the instant restore from backup ${r.backup} (running, ${progress(r)}; ${WATCH_RESTORE})`
    : `the mount goes through the instant restore from backup ${r.backup} (complete, still open by ${r.connections ?? 0} other client(s))`;
  const after = r.state === 'running' ? 'the first mount after that restore is complete' : 'the first mount after they let go';
  return `${through}, which keeps no session; ${active ? `${after} gets one` : `and ${r.target} is not active: once activated, ${after} gets one`}`;
}

/**
 * What an instant restore into a device means for the sessions of its mounts, as activate says
 * it: none while it runs, and none at all while it is stopped (the device is refused).
 */
export function describeRestoreSessions(r: InstantRestoreInfo): string {
  if (r.state === 'stopped') {
    return `an instant restore from backup ${r.backup} into it is stopped, so it is refused to every mount and client, session or not, until that restore is resumed and complete, or given up: ${r.error ?? 'see bdsnap status'}`;
  }
  return `its mounts go through the instant restore from backup ${r.backup} into it (${r.state}, ${progress(r)}), without a session, until that restore is complete and its last client lets go; each mount after that gets a snapshot session (${WATCH_RESTORE})`;
}

/**
 * What else holds a device the daemon has open, and what frees it; undefined when status shows
 * no holder (the caller then says what it knows).
 */
export function describeHolder(d: DeviceStatus): string | undefined {
  if (d.mountpoint) return `mounted through bdsnap at ${d.mountpoint}; run bdsnap umount ${d.mountpoint} first`;
  const view = d.asOfViews?.[0];
  if (view) return describeAsOfView(view);
  if (d.snapshots.length > 0) {
    const ids = d.snapshots.join(' ');
    return `held by bdsnap snapshot${d.snapshots.length > 1 ? 's' : ''} ${ids}; destroy ${d.snapshots.length > 1 ? 'them' : 'it'} first (bdsnap snapshot destroy ${d.snapshots[0]})`;
  }
  if (d.connections > 0) return `open by ${d.connections} NBD client(s) of the bdsnap daemon; disconnect them first`;
  return undefined;
}

/**
 * An as-of view holding its device still, and how it ends: no command closes one, it lives as
 * long as its NBD clients, so its mount is unmounted or its clients disconnected.
 */
export function describeAsOfView(v: AsOfViewStatus): string {
  const end = v.mountpoint !== null ? `run bdsnap umount ${v.mountpoint}` : `disconnect its ${v.connections} NBD client(s) (whatever reads ${v.exportName})`;
  return `served as it was at ${v.mountTime} by the as-of view ${v.exportName} (${v.connections} NBD client(s)${v.mountpoint !== null ? `, mounted through bdsnap at ${v.mountpoint}` : ''}), which needs the device still; the view ends when its last client lets go: ${end} first`;
}

function progress(r: InstantRestoreInfo): string {
  return `${formatBytes(r.doneBytes)} of ${formatBytes(r.totalBytes)} copied${r.secondsLeft !== null ? `, about ${r.secondsLeft} s left` : ''}`;
}
