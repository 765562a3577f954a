from resnet_ddp.entry.cli import run

if __name__ == "__main__":
    run()
