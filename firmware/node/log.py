# Console logging behind an integer level: a technician on the serial port sees what the node
# does; nothing is formatted unless it will be printed.
LEVEL = 2  # 0 silent, 1 errors, 2 info, 3 debug


def error(msg, *args):
    if LEVEL >= 1:
        print("E kinhbac:", msg % args if args else msg)


def info(msg, *args):
    if LEVEL >= 2:
        print("I kinhbac:", msg % args if args else msg)


def debug(msg, *args):
    if LEVEL >= 3:
        print("D kinhbac:", msg % args if args else msg)
