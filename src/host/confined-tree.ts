/**
 * A directory tree that may sit where another user can write (a backup repository), reached
 * without ever following a symbolic link below its root: a link planted at `pieces/ab` must not
 * make root create or delete files in the directory it points to.
 *
 * Node has no openat(2). The tree is walked instead through `/proc/self/fd/<fd>/<name>`: the
 * kernel resolves that magic link to the directory the descriptor holds (wherever it has been
 * moved since), and looks up `<name>` in it alone, so such a path is openat(fd, name). Every
 * directory is opened one component at a time from its parent's descriptor, with O_NOFOLLOW and
 * O_DIRECTORY, and its descriptor kept for the tree's life; files are opened, created (O_EXCL),
 * renamed and removed through their directory's descriptor. So there is no window between a
 * check and a use in which a component could be swapped for a link: nothing is checked by path.
 * (The optional koffi binding could call openat and friends directly, but only where koffi is
 * installed, and each call would block the event loop or need a callback of its own; /proc is
 * there wherever bdsnap runs, and the walk fails closed where it is not.)
 *
 * The root itself is the caller's path, resolved once like any path it names. When running as
 * root, the root and every directory below it must be root's and not writable by group or
 * others: root never works in a tree another user can change. Directories are created 0700.
 *
 * Descriptors stay open until close(): a path from `at()` names a file through one of them, and
 * a reused descriptor number would name another directory.
 */

import fs from 'node:fs';
import path from 'node:path';
import { BdsnapError, toBdsnapError } from '../errors.js';
import { makeDirectoryDurableSync } from './atomic-file.js';
import { fsyncFdSync, makeDirectorySync } from './fd-io.js';

const { O_RDONLY, O_DIRECTORY, O_NOFOLLOW } = fs.constants;
/** (libuv adds O_CLOEXEC to every open.) */
const DIR_FLAGS = O_RDONLY | O_DIRECTORY | O_NOFOLLOW;
const DIR_MODE = 0o700;

export class ConfinedTree {
  /** The root as given, resolved: for messages. */
  readonly root: string;
  /** Descriptors of the directories opened so far, by path below the root ('' is the root). */
  readonly #dirs = new Map<string, number>();
  #closed = false;

  private constructor(root: string, rootFd: number) {
    this.root = root;
    this.#dirs.set('', rootFd);
  }

  /**
   * Open the tree at `root`; undefined when it does not exist and `create` is false, else it
   * is created (mode 0700, parents as needed). Refuses (EPERM) a root root may not use.
   */
  static open(root: string, create: boolean): ConfinedTree | undefined {
    const resolved = path.resolve(root);
    let fd: number;
    try {
      fd = fs.openSync(resolved, O_RDONLY | O_DIRECTORY);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOTDIR') throw new BdsnapError('EINVAL', `${resolved} is not a directory`, { cause: err });
      if (code !== 'ENOENT') throw toBdsnapError(err);
      if (!create) return undefined;
      try {
        makeDirectoryDurableSync(resolved, { recursive: true, mode: DIR_MODE });
        fd = fs.openSync(resolved, O_RDONLY | O_DIRECTORY);
      } catch (e) {
        throw toBdsnapError(e);
      }
    }
    try {
      // The walk needs /proc; without it a lookup would fail with a confusing ENOENT.
      if (!fs.fstatSync(fd).isDirectory() || !fs.statSync(`/proc/self/fd/${fd}`).isDirectory()) throw new Error('not a directory');
    } catch (err) {
      fs.closeSync(fd);
      throw new BdsnapError('ENOTSUP', `cannot open ${resolved} through /proc/self/fd (is /proc mounted?); bdsnap needs it to reach repository files without following links`, { cause: err });
    }
    try {
      checkOwner(fs.fstatSync(fd), resolved);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
    return new ConfinedTree(resolved, fd);
  }

  /**
   * The descriptor of directory `rel` (slash-separated names below the root), opened one
   * component at a time without following links; missing components are created (0700) when
   * `create`, else the answer is undefined. Errors: EPERM for a link or a directory another
   * user could change, EINVAL for something that is not a directory.
   *
   * Synchronous: a directory is opened once per tree, and a caller that needs a path at once
   * (a worker's file name) can have it. Creating one may wait for the disk; that happens once
   * per directory of a repository's life.
   */
  dir(rel: string, create: boolean): number | undefined {
    if (this.#closed) throw new BdsnapError('ESHUTDOWN', `${this.root} is closed`);
    const known = this.#dirs.get(rel);
    if (known !== undefined) return known;
    const cut = rel.lastIndexOf('/');
    const parent = this.dir(cut >= 0 ? rel.slice(0, cut) : '', create);
    if (parent === undefined) return undefined;
    const name = rel.slice(cut + 1);
    const full = path.join(this.root, rel);
    let fd: number | undefined;
    try {
      fd = openDirAt(parent, name);
      if (fd === undefined && create) {
        try {
          makeDirectorySync(ConfinedTree.at(parent, name), { mode: DIR_MODE });
        } catch (err) {
          // Another writer made it first: open what is there, with the same checks.
          if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        }
        // The new name is in the parent: only the parent's fsync makes it (and every object
        // published below it) survive a power loss. Also when another writer made it, since
        // that writer may not have synced it yet.
        fsyncFdSync(parent);
        fd = openDirAt(parent, name);
      }
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ELOOP' || code === 'ENOTDIR') throw notADirectory(parent, name, full, err);
      throw toBdsnapError(err);
    }
    if (fd === undefined) return undefined;
    try {
      checkOwner(fs.fstatSync(fd), full);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
    this.#dirs.set(rel, fd);
    return fd;
  }

  /** A path naming `name` in the directory `dirFd` of this tree, and nothing else, while the tree is open. */
  static at(dirFd: number, name: string): string {
    return `/proc/self/fd/${dirFd}/${name}`;
  }

  /** Close every directory; paths from at() are invalid afterwards. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const fd of this.#dirs.values()) fs.closeSync(fd);
    this.#dirs.clear();
  }
}

/** The directory `name` in `parent`, not following a link; undefined if absent. */
function openDirAt(parent: number, name: string): number | undefined {
  try {
    return fs.openSync(ConfinedTree.at(parent, name), DIR_FLAGS);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

function notADirectory(parent: number, name: string, full: string, cause: unknown): BdsnapError {
  let link = false;
  try {
    link = fs.lstatSync(ConfinedTree.at(parent, name)).isSymbolicLink();
  } catch {
    // Gone since: say what the open said.
  }
  if (link) return new BdsnapError('EPERM', `${full} is a symbolic link; a repository holds none, and bdsnap does not follow one there: remove it`, { cause });
  return new BdsnapError('EINVAL', `${full} is not a directory`, { cause });
}

/**
 * Running as root: refuse a directory another user owns or may write to, since that user
 * could put links or files into it between our check and our use of what is inside.
 */
function checkOwner(st: fs.Stats, full: string): void {
  if ((process.geteuid?.() ?? -1) !== 0) return;
  if (st.uid !== 0) {
    throw new BdsnapError('EPERM', `${full} is owned by uid ${st.uid}; root uses a repository only where no other user can change it: chown -R root: ${full}`);
  }
  if ((st.mode & 0o022) !== 0) {
    throw new BdsnapError('EPERM', `${full} is writable by group or others (mode ${(st.mode & 0o777).toString(8)}); root uses a repository only where no other user can change it: chmod -R go-w ${full}`);
  }
}
