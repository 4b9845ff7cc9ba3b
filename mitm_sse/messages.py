"""Message kinds on the queue from the proxy (tap, hooks) to the writer. Small ints: cheapest to build on
the event loop. Kept in their own module so the proxy process never imports the writer's heavy dependencies
(pyarrow, duckdb): a proxy left on as the system proxy should not carry them."""

OPEN, CHUNK, END, SYNC, STOP = 0, 1, 2, 3, 4
