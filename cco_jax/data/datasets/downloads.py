"""Downloads that fail fast and say what to do instead.

Without a network, TFDS's downloader retries a refused or unresolvable host
for minutes and ends in a `requests` traceback. Before a download starts,
`check_reachable` opens one TCP connection to each host (or to the proxy of
$HTTPS_PROXY / $HTTP_PROXY), bounded by `PROBE_TIMEOUT_S` including name
resolution; an archive TFDS already downloaded (in its download dir) is not
probed. A host that cannot be reached, and a download that fails anyway
(HTTP error, reset), end in one `UserError` that names `--manual_dir` and
`--download_mirror`.
"""

from __future__ import annotations

from collections.abc import Iterable
import concurrent.futures
import os
import socket
import urllib.parse
import urllib.request

from tensorflow_datasets.core.download import resource

from cco_jax import errors

PROBE_TIMEOUT_S = 10.0
FIX = (
  'Without a network, prepare from a local copy in the official layout with '
  '--manual_dir=DIR (python -m experiments.prepare; config.data.manual_dir, '
  'or config.data.ood_manual_dir for Cats-vs-Dogs), or name a server of the '
  'official file names with --download_mirror=URL (docs/data.md).'
)


def download_error(url: str, reason: str) -> errors.UserError:
  """The one-line error of a download of `url` that cannot happen."""
  return errors.UserError(f'cannot download {url} ({reason}). {FIX}')


def _endpoint(url: str) -> tuple[str, int]:
  """(host, port) a download of `url` connects to (its proxy, if any)."""
  parts = urllib.parse.urlsplit(url)
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(parts.hostname or ''):
    parts = urllib.parse.urlsplit(proxy if '://' in proxy else f'//{proxy}')
  port = parts.port or (443 if parts.scheme == 'https' else 80)
  return parts.hostname or '', port


def _connect(endpoint: tuple[str, int], timeout_s: float) -> None:
  with socket.create_connection(endpoint, timeout=timeout_s):
    pass


def check_reachable(
  urls: Iterable[str], timeout_s: float = PROBE_TIMEOUT_S
) -> None:
  """Raises `download_error` unless a TCP connection to each URL's host (or
  proxy) opens within `timeout_s` (name resolution included)."""
  checked = set()
  for url in urls:
    endpoint = _endpoint(url)
    if endpoint in checked:
      continue
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:  # getaddrinfo has no timeout of its own: bound it here.
      pool.submit(_connect, endpoint, timeout_s).result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
      raise download_error(
        url, f'{endpoint[0]}:{endpoint[1]} did not answer in {timeout_s:.0f} s'
      ) from None
    except OSError as e:
      reason = (
        f'cannot resolve host {endpoint[0]!r}'
        if isinstance(e, socket.gaierror)
        else f'{endpoint[0]}:{endpoint[1]}: {e.strerror or e}'
      )
      raise download_error(url, reason) from None
    finally:
      pool.shutdown(wait=False)
    checked.add(endpoint)


def already_downloaded(download_dir: str | os.PathLike, url: str) -> bool:
  """Whether TFDS's `download_dir` holds a download of `url` (by the name
  TFDS gives it: the URL's host and path, then a hash)."""
  prefix = resource.get_dl_fname(url).rsplit('_', 1)[0]
  try:
    return any(name.startswith(prefix) for name in os.listdir(download_dir))
  except OSError:
    return False
