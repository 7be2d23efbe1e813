from moeut.train import cli

if __name__ == "__main__":
    cli()
