"""sshfiles: a multi-user SFTP server on asyncssh.

The data path reads top to bottom: SSH connection (server.py) -> account
(accounts.py) -> jail (jail.py) -> quota (quota.py) -> file (sftp.py).
"""

__version__ = "0.1.0"
