"""Run in the vLLM venv: vLLM's own ZmqEventPublisher, driven by lines on stdin.

argv: PUB endpoint, replay endpoint, topic. Stdin commands: `publish N` publishes N batches (each a
BlockStored of one block, plus a BlockRemoved of the previous one every third batch) and answers
`done SEQ` with the last sequence number once its thread has sent them; `quit` shuts it down.
Block hashes are 1000 + batch number, so the test knows what was published.
"""
import sys
import time

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch, ZmqEventPublisher


def main() -> None:
    endpoint, replay, topic = sys.argv[1:4]
    pub = ZmqEventPublisher(0, endpoint=endpoint, replay_endpoint=replay, topic=topic)
    n = 0
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        for _ in range(int(cmd[1])):
            h = 1000 + n
            events = [BlockStored(block_hashes=[h], parent_block_hash=h - 1 if n else None, token_ids=list(range(32)),
                                  block_size=32, lora_id=None, medium="GPU", lora_name=None)]
            if n % 3 == 2:
                events.append(BlockRemoved(block_hashes=[h - 1], medium="GPU"))
            pub.publish(KVEventBatch(ts=time.time(), events=events))
            n += 1
        pub._event_queue.join()  # its thread marks each batch done after sending and buffering it
        print(f"done {n - 1}", flush=True)
    pub.shutdown()


if __name__ == "__main__":
    main()
