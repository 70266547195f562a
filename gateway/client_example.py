"""Runnable example of the gRPC client: ``python -m gateway.client_example [--address HOST:PORT]``.

Start the system first (``pdserve up``; it prints the gRPC address).
"""

from __future__ import annotations

import argparse
import asyncio

from gateway.client import AsyncClient, Client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:8001")
    parser.add_argument("--prompt", default="The lighthouse keeper")
    args = parser.parse_args()

    with Client(args.address) as client:
        print("models:", client.models())
        out = client.generate(args.prompt, max_tokens=16, temperature=0)
        print(f"sync:  {out.text!r} ({out.completion_tokens} tokens, {out.finish_reason})")
        print("stream:", end=" ")
        for delta in client.stream(args.prompt, max_tokens=16, temperature=0.8, seed=1):
            print(delta.text, end="", flush=True)
        print()

    async def run_async() -> None:
        async with AsyncClient(args.address) as client:
            outs = await asyncio.gather(
                *(client.generate(f"{args.prompt} {i}", max_tokens=8) for i in range(4))
            )
            for out in outs:
                print(f"async: {out.text!r}")

    asyncio.run(run_async())


if __name__ == "__main__":
    main()
