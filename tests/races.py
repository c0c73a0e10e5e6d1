"Start calls together: `race` (the `race` fixture in conftest, importable for helpers that run in subprocesses)."

import threading


def race(fns, catch=(), timeout: float = 60) -> list:
    """Call each of `fns` on its own thread, all released at one barrier; their results in order. An exception of a type
    in `catch` is returned as that call's outcome; any other is raised once every call has ended."""
    start, out = threading.Barrier(len(fns)), [None] * len(fns)

    def run(i):
        start.wait()
        try:
            out[i] = fns[i]()
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"a racing call was still running after {timeout}s"
    if err := next((o for o in out if isinstance(o, Exception) and not isinstance(o, catch)), None):
        raise err
    return out
