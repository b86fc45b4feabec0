"""``python -m amqp_queue.demo``: the same as ``amqp-queue demo``."""

from amqp_queue.cli.runners import demo

if __name__ == "__main__":
    demo(prog_name="python -m amqp_queue.demo")
